"""Streaming chat through any OpenAI-compatible endpoint, with the official SDK.

`OpenAICompatLLM` implements the `LLM` contract of `actors/providers/base.py`:
text deltas are yielded as they arrive (the dialogue hands them to TTS at
once), tool calls are assembled from their fragments and yielded whole at
the end of the reply (the dialogue runs them and calls `stream` again), and
the token usage of the reply is kept in `last_usage` and yielded last.

Choices made here, and why:
- Failures that a retry may cure (429, 5xx, 408/409, connection failures)
  are marked `retryable`; the `retries` settings below are the policy of the
  `RetryLLM` wrapper each failover link gets (adapters/retry.py), which
  retries only while nothing has reached the caller.
- Timeouts are not retryable: when the first token is late the listener is
  already waiting, and a second wait of the same length helps nobody.
- Tool-call arguments that are not a JSON object are passed on as
  `{"_raw": "<text>"}` instead of failing the turn: the tool registry answers
  with an error result, the model sees it and can correct itself.
- The API key never appears in logs or error messages (the 401 body of some
  vendors echoes it, so that body is dropped and the SDK's exception is not
  chained); errors name the environment variable to set instead.
- `openai` is imported lazily: the SDK takes ~1.4 s to import, and loading a
  configuration or building a local-only session must not pay that.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from actors.providers.base import LLM, ChatMessage, LLMChunk, ProviderError, ToolCall, ToolSpec

if TYPE_CHECKING:
    from openai import AsyncOpenAI

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://dashscope.aliyuncs.com/compatible-mode/v1"
KEYLESS_PLACEHOLDER = "not-needed"
"""Sent as the key when `api_key_env` is None (local servers that ignore it);
the SDK refuses to build a client without one."""
_DETAIL_MAX = 200


class OpenAICompatConfig(BaseModel):
    """Configuration of one OpenAI-compatible endpoint (`llm.openai_compat`)."""

    model_config = ConfigDict(extra="forbid")

    base_url: str = DEFAULT_BASE_URL
    model: str = "qwen-plus"
    api_key_env: str | None = "DASHSCOPE_API_KEY"
    """Environment variable holding the key. None: the endpoint needs no key
    (a local llama.cpp / Ollama / vLLM server)."""
    api_key: SecretStr | None = None
    """The key itself; wins over `api_key_env`. Prefer the environment."""
    temperature: float | None = Field(0.7, ge=0, le=2)
    """None: the server's default."""
    max_tokens: int | None = Field(512, ge=1)
    """Spoken replies are short; this bounds cost and a runaway reply."""
    timeout_s: float = Field(30.0, gt=0)
    """Longest one request (one streamed reply) may take, end to end."""
    first_token_timeout_s: float = Field(10.0, gt=0)
    """Longest wait from sending the request to the first text, tool-call or
    reasoning delta."""
    retries: int = Field(2, ge=0, le=10)
    """Further attempts after a retryable failure, only before any output
    (the `RetryLLM` wrapper's policy, `RetryPolicy.of`)."""
    retry_backoff_s: float = Field(0.5, ge=0)
    """First back-off; doubles per retry, with jitter (×0.5–1)."""
    retry_max_backoff_s: float = Field(4.0, ge=0)
    """Cap on one back-off, also on a server's Retry-After."""
    extra_body: dict[str, Any] = {}
    """Vendor extras merged into the request body, e.g. `{"enable_thinking": false}` for Qwen 3."""


# ------------------------------------------------------------------ provider


class OpenAICompatLLM(LLM):
    """The LLM contract over `AsyncOpenAI(...).chat.completions.create(stream=True)`.

    One instance per session (the SDK client and `last_usage` are per
    instance); `stream` is not meant to run twice at once on one instance.
    """

    label = "openai-compatible"

    def __init__(self, cfg: OpenAICompatConfig | Any = None, system_prompt: str | None = None) -> None:
        # Anything else is taken for the application config, so the plug-in
        # form `llm.provider: actors.providers.openai_compat.llm:OpenAICompatLLM`
        # (built as `Class(config)`) works too.
        self.cfg = cfg if isinstance(cfg, OpenAICompatConfig) else config_from_app(cfg)
        self.system_prompt = system_prompt
        self.last_usage: dict[str, int] | None = None
        """prompt/completion/total tokens of the last finished reply, if the server sent them."""
        self._client: AsyncOpenAI | None = None
        self._key: SecretStr | None = None
        try:
            # Import the SDK (~1.4 s) and build the client now, when the
            # session is made (ahead, in the warm pool), not in the first turn.
            self._get_client()
        except ProviderError:
            pass  # no key: `stream` reports it, where the client sees the error

    @classmethod
    def from_app_config(cls, config: Any, system_prompt: str | None = None) -> OpenAICompatLLM:
        """Build from `config.llm.openai_compat` (defaults when it is absent)."""
        return cls(config_from_app(config), system_prompt)

    async def aclose(self) -> None:
        """Close the SDK's connection pool (a session ending)."""
        if self._client is not None:
            await self._client.close()
            self._client = None

    # -- the contract --------------------------------------------------------
    async def stream(self, messages: list[ChatMessage], tools: list[ToolSpec]) -> AsyncIterator[LLMChunk]:
        """Stream one reply (one request). A failure is raised as a
        `ProviderError` marked `retryable` where a retry may help; the retry
        itself is the `RetryLLM` wrapper's (providers/adapters/retry.py).

        Stop iterating (or cancel the consuming task) to interrupt: the HTTP
        stream is closed when this generator is closed, so call `aclose()` on
        it (or use `contextlib.aclosing`) rather than just breaking out.
        """
        self.last_usage = None
        client = self._get_client()
        request = build_request(self.cfg, messages, tools, self.system_prompt)
        try:
            async with aclosing(self._attempt(client, request)) as chunks:
                async for chunk in chunks:
                    yield chunk
        except Exception as exc:
            failure = classify(exc, self.cfg, self._scrub)
            failure.error.retryable, failure.error.retry_after_s = failure.retryable, failure.retry_after_s
            if failure.error is exc:
                raise
            raise failure.error from (None if failure.hide_cause else exc)

    # -- one attempt -------------------------------------------------------------
    async def _attempt(self, client: AsyncOpenAI, request: dict[str, Any]) -> AsyncIterator[LLMChunk]:
        """One HTTP request. Raises the SDK's exceptions (classified by the
        caller) or `ProviderError("llm.timeout")`."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        end_at = started + self.cfg.timeout_s
        first_at = min(end_at, started + self.cfg.first_token_timeout_s)
        reply = _ReplyState()
        try:
            async with asyncio.timeout_at(first_at):
                stream = await client.chat.completions.create(**request)
        except TimeoutError:
            raise self._timeout(first_token=True) from None
        async with stream:
            while True:
                try:
                    async with asyncio.timeout_at(end_at if reply.progressed else first_at):
                        chunk = await anext(stream)
                except StopAsyncIteration:
                    break
                except Exception as exc:
                    if not reply.finished:
                        if isinstance(exc, TimeoutError):
                            raise self._timeout(first_token=not reply.progressed) from None
                        raise
                    # The reply was complete; only the trailer (usage, [DONE]) was lost.
                    log.info("LLM %s: stream ended badly after the reply (%s)", self.cfg.model, type(exc).__name__)
                    break
                waiting = not reply.progressed
                outs = reply.take(chunk)
                if waiting and reply.progressed:
                    log.debug("LLM %s: first token after %.3f s", self.cfg.model, loop.time() - started)
                for out in outs:
                    yield out
        for out in reply.finish():
            yield out
        if reply.usage is not None:
            self.last_usage = reply.usage
            yield usage_chunk(reply.usage)

    def _timeout(self, *, first_token: bool) -> ProviderError:
        if first_token:
            return ProviderError("llm.timeout", f"the LLM sent nothing within {self.cfg.first_token_timeout_s:g} s")
        return ProviderError("llm.timeout", f"the LLM reply took longer than {self.cfg.timeout_s:g} s")

    # -- credentials -------------------------------------------------------------
    def _get_client(self) -> AsyncOpenAI:
        if self._client is None:
            import openai  # lazily: ~1.4 s

            self._key = SecretStr(resolve_api_key(self.cfg))
            self._client = openai.AsyncOpenAI(base_url=self.cfg.base_url, api_key=self._key.get_secret_value(),
                                              timeout=self.cfg.timeout_s, max_retries=0)
        return self._client

    def _scrub(self, text: str) -> str:
        """Remove the key from text that came from the server."""
        key = self._key.get_secret_value() if self._key is not None else ""
        return text.replace(key, "***") if len(key) >= 4 else text


def config_from_app(config: Any) -> OpenAICompatConfig:
    """`config.llm.openai_compat` as an `OpenAICompatConfig`, whether it is
    absent, a dict, this model or another pydantic model of the same fields."""
    section = getattr(getattr(config, "llm", None), "openai_compat", None)
    if section is None:
        return OpenAICompatConfig()
    if isinstance(section, OpenAICompatConfig):
        return section
    if isinstance(section, BaseModel):
        section = {name: getattr(section, name) for name in type(section).model_fields}
    return OpenAICompatConfig.model_validate(section)


def resolve_api_key(cfg: OpenAICompatConfig) -> str:
    if cfg.api_key is not None and cfg.api_key.get_secret_value():
        return cfg.api_key.get_secret_value()
    if cfg.api_key_env is None:
        return KEYLESS_PLACEHOLDER
    key = os.environ.get(cfg.api_key_env, "").strip()
    if not key:
        raise ProviderError("llm.auth", f"no API key for the LLM provider: set ${cfg.api_key_env}")
    return key


def key_hint(cfg: OpenAICompatConfig) -> str:
    if cfg.api_key is not None:
        return "check llm.openai_compat.api_key"
    if cfg.api_key_env is None:
        return "it wants a key: set llm.openai_compat.api_key_env"
    return f"set ${cfg.api_key_env}"


# ------------------------------------------------------------------ request


def build_request(cfg: OpenAICompatConfig, messages: list[ChatMessage], tools: list[ToolSpec],
                  system_prompt: str | None = None) -> dict[str, Any]:
    """Keyword arguments for `chat.completions.create`."""
    request: dict[str, Any] = {
        "model": cfg.model,
        "messages": to_openai_messages(messages, system_prompt),
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if tools:
        request["tools"] = [to_openai_tool(t) for t in tools]
    if cfg.temperature is not None:
        request["temperature"] = cfg.temperature
    if cfg.max_tokens is not None:
        # max_tokens, not max_completion_tokens: the compatible servers
        # (DashScope, vLLM, Ollama) read this one.
        request["max_tokens"] = cfg.max_tokens
    if cfg.extra_body:
        request["extra_body"] = dict(cfg.extra_body)
    return request


def to_openai_messages(messages: list[ChatMessage], system_prompt: str | None = None) -> list[dict[str, Any]]:
    """The project's history as chat messages; `system_prompt` goes first
    unless the history already carries a system message."""
    out: list[dict[str, Any]] = []
    if system_prompt and not any(m.role == "system" for m in messages):
        out.append({"role": "system", "content": system_prompt})
    out.extend(to_openai_message(m) for m in messages)
    return out


def to_openai_message(m: ChatMessage) -> dict[str, Any]:
    if m.role == "tool":
        return {"role": "tool", "tool_call_id": m.tool_call_id or "", "content": m.content}
    if m.role == "assistant" and m.tool_calls:
        # content "" rather than null: some compatible servers reject null.
        return {"role": "assistant", "content": m.content, "tool_calls": [
            {"id": c.id, "type": "function",
             "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)}}
            for c in m.tool_calls]}
    return {"role": m.role, "content": m.content}


def to_openai_tool(spec: ToolSpec) -> dict[str, Any]:
    parameters = spec.parameters or {"type": "object", "properties": {}}
    return {"type": "function", "function": {"name": spec.name, "description": spec.description,
                                             "parameters": parameters}}


# -------------------------------------------------------------------- reply


@dataclass
class _PartialCall:
    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)


class ToolCallAssembler:
    """Tool calls from their streamed fragments, keyed by `index`.

    `id` and `name` come in a call's first fragment (some servers repeat
    them, possibly empty, later: only non-empty values count); `arguments`
    come in pieces to concatenate; parallel calls may interleave.
    """

    def __init__(self) -> None:
        self._calls: dict[int, _PartialCall] = {}

    def __bool__(self) -> bool:
        return bool(self._calls)

    def add(self, fragment: Any) -> None:
        call = self._calls.setdefault(self._index_of(fragment), _PartialCall())
        if getattr(fragment, "id", None):
            call.id = fragment.id
        function = getattr(fragment, "function", None)
        if function is not None:
            if function.name:
                call.name = function.name
            if function.arguments:
                call.arguments.append(function.arguments)

    def _index_of(self, fragment: Any) -> int:
        """Servers that leave out `index` start a new call with a new id."""
        if getattr(fragment, "index", None) is not None:
            return fragment.index
        if not self._calls:
            return 0
        last = max(self._calls)
        new_id = getattr(fragment, "id", None)
        return last + 1 if new_id and new_id != self._calls[last].id else last

    def flush(self) -> list[ToolCall]:
        """The calls assembled so far, in index order; forgets them."""
        calls = [self._finish(self._calls[i]) for i in sorted(self._calls)]
        self._calls.clear()
        return calls

    @staticmethod
    def _finish(call: _PartialCall) -> ToolCall:
        return ToolCall(id=call.id or f"call_{uuid.uuid4().hex[:24]}", name=call.name,
                        arguments=parse_arguments("".join(call.arguments), call.name))


def parse_arguments(text: str, name: str = "") -> dict[str, Any]:
    """A JSON object; "" means no arguments; anything else is kept as
    `{"_raw": text}` so the tool registry reports it to the model."""
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if isinstance(value, dict):
        return value
    log.warning("tool call %r: arguments are not a JSON object; passed on as _raw", name)
    return {"_raw": text}


class _ReplyState:
    """What one streamed reply has produced so far."""

    def __init__(self) -> None:
        self.calls = ToolCallAssembler()
        self.usage: dict[str, int] | None = None
        self.progressed = False
        """A text, tool-call or reasoning delta arrived (the first token)."""
        self.finished = False
        """A finish_reason arrived: the reply itself is complete."""

    def take(self, chunk: Any) -> list[LLMChunk]:
        """Chunks to yield for one SDK chunk."""
        out: list[LLMChunk] = []
        usage = getattr(chunk, "usage", None)
        if usage is not None:
            self.usage = usage_dict(usage)
        for choice in chunk.choices:  # the usage chunk has none
            if choice.index != 0:
                continue
            out += self._take_delta(choice.delta)
            if choice.finish_reason:
                out += self._take_finish(choice.finish_reason)
        return out

    def _take_delta(self, delta: Any) -> list[LLMChunk]:
        if delta is None:
            return []
        for fragment in delta.tool_calls or []:
            self.calls.add(fragment)
            self.progressed = True
        if getattr(delta, "reasoning_content", None):
            self.progressed = True  # a thinking model is working, not stalled
        if delta.content:
            self.progressed = True
            return [LLMChunk(text=delta.content)]
        return []

    def _take_finish(self, reason: str) -> list[LLMChunk]:
        self.finished = True
        if reason == "length":
            log.info("LLM reply cut at max_tokens")
        elif reason == "content_filter":
            log.warning("LLM reply stopped by the provider's content filter")
        return [LLMChunk(tool_call=c) for c in self.calls.flush()] if reason == "tool_calls" else []

    def finish(self) -> list[LLMChunk]:
        """Tool calls still held when the stream ended (servers that end a
        tool-call reply with finish_reason "stop", or none)."""
        return [LLMChunk(tool_call=c) for c in self.calls.flush()]


def usage_dict(usage: Any) -> dict[str, int]:
    return {k: int(getattr(usage, k, 0) or 0) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}


@dataclass
class UsageChunk(LLMChunk):
    """`LLMChunk` with the reply's token usage, until base.py's LLMChunk has
    a `usage` field of its own (then `usage_chunk` builds a plain one)."""

    usage: dict[str, int] | None = None


_CHUNK_HAS_USAGE = "usage" in {f.name for f in dataclasses.fields(LLMChunk)}


def usage_chunk(usage: dict[str, int]) -> LLMChunk:
    """The last chunk of a reply: no text, only `usage`."""
    return LLMChunk(usage=usage) if _CHUNK_HAS_USAGE else UsageChunk(usage=usage)  # type: ignore[call-arg]


# ------------------------------------------------------------------- errors


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
