"""Retry with back-off and jitter, as a wrapper around any provider.

Only where it is safe: an LLM reply is retried only while nothing of it has
reached the listener (a retry after a few words would speak a second,
different reply), a sentence's synthesis only before its first audio, a
batch transcription always (nothing of it is heard). Only failures the
provider marked `retryable` (a 429, a 5xx, a refused connection) are retried;
a timeout is not: the listener is already waiting, and the failover chain
(the next provider) is the faster way out.

A provider opts in through its config section: `retries`, `retry_backoff_s`
and `retry_max_backoff_s` (`RetryPolicy.of`); a section without them gets no
wrapper. The wrapper sits inside each link of the failover chain, so a link
is retried before the chain moves on.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, TypeVar

from actors.providers.base import LLM, STT, TTS, AudioSegment, ChatMessage, LLMChunk, ProviderError, ToolSpec

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 2
    """Further attempts after a retryable failure."""
    backoff_s: float = 0.5
    """First back-off; doubles per retry, with jitter (×0.5–1)."""
    max_backoff_s: float = 4.0

    @classmethod
    def of(cls, settings: Any) -> RetryPolicy | None:
        """The policy a provider's config section declares; None when it declares none."""
        retries = getattr(settings, "retries", None)
        if not isinstance(retries, int) or retries <= 0:
            return None
        return cls(retries, float(getattr(settings, "retry_backoff_s", cls.backoff_s)),
                   float(getattr(settings, "retry_max_backoff_s", cls.max_backoff_s)))

    def delay_s(self, attempt: int, retry_after_s: float | None = None) -> float:
        """Exponential back-off with jitter; a server's Retry-After, when
        longer, wins (both capped at `max_backoff_s`)."""
        delay = self.backoff_s * (2 ** attempt) * random.uniform(0.5, 1.0)
        if retry_after_s is not None:
            delay = max(delay, retry_after_s)
        return min(delay, self.max_backoff_s)

    def should_retry(self, error: BaseException, attempt: int) -> bool:
        return isinstance(error, ProviderError) and error.retryable and attempt < self.retries

    async def call(self, what: str, attempt_once: Callable[[], Awaitable[T]]) -> T:
        """A whole-answer call (nothing of it reaches anyone before it returns), retried."""
        attempt = 0
        while True:
            try:
                return await attempt_once()
            except ProviderError as e:
                if not self.should_retry(e, attempt):
                    raise
                await self.wait(what, e, attempt)
                attempt += 1

    async def wait(self, what: str, error: ProviderError, attempt: int) -> None:
        delay = self.delay_s(attempt, error.retry_after_s)
        log.warning("%s: %s; retry %d/%d in %.2f s", what, error.code, attempt + 1, self.retries, delay)
        await asyncio.sleep(delay)


class RetryLLM(LLM):
    """Retries a reply that failed before its first text or tool call."""

    def __init__(self, inner: LLM, policy: RetryPolicy) -> None:
        self.inner, self.policy = inner, policy
        self.label = inner.label

    async def stream(self, messages: list[ChatMessage], tools: list[ToolSpec]) -> AsyncIterator[LLMChunk]:
        attempt = 0
        while True:
            delivered = False
            try:
                async with aclosing(self.inner.stream(messages, tools)) as chunks:  # type: ignore[type-var]
                    async for chunk in chunks:
                        delivered = delivered or bool(chunk.text or chunk.tool_call)
                        yield chunk
                return
            except ProviderError as e:
                if delivered or not self.policy.should_retry(e, attempt):
                    raise
                await self.policy.wait(f"LLM {self.label}", e, attempt)
                attempt += 1

    def __getattr__(self, name: str) -> Any:
        """The provider's own attributes (`last_usage`, `cfg`) read through."""
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


class RetryTTS(TTS):
    """Retries a sentence whose synthesis failed before its first audio."""

    def __init__(self, inner: TTS, policy: RetryPolicy) -> None:
        self.inner, self.policy = inner, policy

    async def synthesize(self, text: str) -> AudioSegment:
        return await self.policy.call("speech synthesis", lambda: self.inner.synthesize(text))

    async def stream(self, text: str) -> AsyncIterator[AudioSegment]:
        attempt = 0
        while True:
            sent = False
            try:
                async with aclosing(self.inner.stream(text)) as pieces:  # type: ignore[type-var]
                    async for piece in pieces:
                        sent = True
                        yield piece
                return
            except ProviderError as e:
                if sent or not self.policy.should_retry(e, attempt):
                    raise
                await self.policy.wait("speech synthesis", e, attempt)
                attempt += 1


class RetrySTT(STT):
    """Retries a whole-utterance transcription. A stream is not retried here:
    the failover chain replays its audio to the next provider."""

    def __init__(self, inner: STT, policy: RetryPolicy) -> None:
        self.inner, self.policy = inner, policy

    async def transcribe(self, pcm16: bytes) -> str:
        return await self.policy.call("speech recognition", lambda: self.inner.transcribe(pcm16))

    def open_stream(self, interim_every_s: float = 0.0) -> Any:
        if type(self.inner).open_stream is STT.open_stream:  # a batch decoder: its stream's decodes retry too
            return super().open_stream(interim_every_s)
        return self.inner.open_stream(interim_every_s)


def with_retries(stage: str, provider: Any, settings: Any) -> Any:
    """The provider behind the retry policy its section declares; as it is when none."""
    policy = RetryPolicy.of(settings)
    if policy is None:
        return provider
    wrapper = {"llm": RetryLLM, "tts": RetryTTS, "stt": RetrySTT}[stage]
    return wrapper(provider, policy)
