"""The SDK's exceptions as stable `ProviderError` codes, marked retryable
where a retry may cure them, and never quoting the key."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from actors.providers.base import ProviderError

if TYPE_CHECKING:
    from actors.providers.openai_compat.llm import OpenAICompatConfig

_DETAIL_MAX = 200


def key_hint(cfg: OpenAICompatConfig) -> str:
    if cfg.api_key is not None:
        return "check llm.openai_compat.api_key"
    if cfg.api_key_env is None:
        return "it wants a key: set llm.openai_compat.api_key_env"
    return f"set ${cfg.api_key_env}"


@dataclass
class Failure:
    """A classified failure: the error for the caller and whether to retry."""

    error: ProviderError
    retryable: bool = False
    retry_after_s: float | None = None
    hide_cause: bool = False
    """Do not chain the SDK's exception (its message may quote the key)."""


def classify(exc: BaseException, cfg: OpenAICompatConfig, scrub: Any = lambda s: s) -> Failure:
    """Map the SDK's exceptions to stable `ProviderError` codes."""
    import openai

    if isinstance(exc, ProviderError):
        return Failure(exc, hide_cause=exc.code == "llm.auth")
    if isinstance(exc, (openai.AuthenticationError, openai.PermissionDeniedError)):
        return Failure(ProviderError("llm.auth", f"the LLM provider refused the key ({key_hint(cfg)})"),
                       hide_cause=True)
    if isinstance(exc, openai.RateLimitError):
        return Failure(ProviderError("llm.rate_limited", "the LLM provider is rate limiting requests (HTTP 429)"
                                     + _detail(exc, scrub)), retryable=True, retry_after_s=_retry_after_s(exc))
    if isinstance(exc, openai.APIStatusError):
        return _status_failure(exc, scrub)
    if isinstance(exc, openai.APITimeoutError):
        return Failure(ProviderError("llm.timeout", f"the LLM provider did not answer within {cfg.timeout_s:g} s"))
    if isinstance(exc, openai.APIConnectionError):
        return Failure(ProviderError("llm.unreachable", f"no connection to the LLM provider at {_origin(cfg.base_url)}"
                                     " (refused, unresolved or dropped)"),
                       retryable=True)
    if isinstance(exc, openai.APIError):  # an error event inside the stream
        return Failure(ProviderError("llm.stream_error", "the LLM provider reported an error mid-reply"
                                     + _detail(exc, scrub)))
    return Failure(ProviderError("llm.failed", f"the LLM stream failed: {type(exc).__name__}"))


def _status_failure(exc: Any, scrub: Any) -> Failure:
    status = exc.status_code
    if status >= 500 or status in (408, 409):
        return Failure(ProviderError("llm.unavailable", f"the LLM provider is unavailable (HTTP {status})"
                                     + _detail(exc, scrub)), retryable=True, retry_after_s=_retry_after_s(exc))
    return Failure(ProviderError("llm.bad_request", f"the LLM provider refused the request (HTTP {status})"
                                 + _detail(exc, scrub) + "; check llm.openai_compat.model and base_url"))


def _detail(exc: Any, scrub: Any) -> str:
    """The server's own error message, short and without the key."""
    body = getattr(exc, "body", None)
    message = body.get("message") if isinstance(body, dict) else None
    if not isinstance(message, str) or not message.strip():
        return ""
    message = scrub(message.strip())
    return ": " + (message[:_DETAIL_MAX] + "…" if len(message) > _DETAIL_MAX else message)


def _retry_after_s(exc: Any) -> float | None:
    """`retry-after-ms` or `retry-after` (seconds) from the response."""
    headers = getattr(getattr(exc, "response", None), "headers", None) or {}
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        try:
            return max(0.0, float(headers.get(name)) * scale)
        except (TypeError, ValueError):
            continue
    return None


def _origin(url: str) -> str:
    """scheme://host[:port] of a URL, without any user:password part."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")
