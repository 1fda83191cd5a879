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
import logging
import os
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from actors.providers.base import LLM, ChatMessage, LLMChunk, ProviderError, ToolSpec
from actors.providers.openai_compat.failures import classify
from actors.providers.openai_compat.messages import build_request
from actors.providers.openai_compat.reply import ReplyState, usage_chunk

if TYPE_CHECKING:
    from openai import AsyncOpenAI

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://dashscope.aliyuncs.com/compatible-mode/v1"
KEYLESS_PLACEHOLDER = "not-needed"
"""Sent as the key when `api_key_env` is None (local servers that ignore it);
the SDK refuses to build a client without one."""


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
        reply = ReplyState()
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
