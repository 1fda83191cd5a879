"""Concurrency and rate limits per API key, cluster-wide.

A vendor's quota belongs to the key, not to a session or a node: DashScope
counts paraformer, CosyVoice and Qwen calls made with one key together. So
the limits are configured by the environment variable that holds the key
(`resilience.key_limits: {DASHSCOPE_API_KEY: {max_concurrency: 20,
requests_per_second: 10}}`; a name, never the secret), and one named actor
per variable hands out leases to every session and replica in the cluster.

A call that cannot get a lease within `max_wait_s` fails with
`<stage>.rate_limited`, which its failover chain treats like the vendor's own
429: the next provider answers. Leases expire after `lease_ttl_s`, so a
session that died holding one does not shrink the quota for good.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from typing import Any

import ray

from actors.config import KeyLimit
from actors.providers.base import (
    LLM,
    STT,
    TTS,
    AudioSegment,
    ChatMessage,
    LLMChunk,
    ProviderError,
    SpeechEvent,
    STTStreamSession,
    ToolSpec,
)


class Leases:
    """The bookkeeping, apart from Ray so it can be tested on its own clock."""

    def __init__(self, limit: KeyLimit, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self._clock = clock
        self._held: dict[str, float] = {}
        """lease id → expiry."""
        self._tokens = max(1.0, limit.requests_per_second)
        self._refilled = clock()
        self.granted = 0
        self.refused = 0

    def try_acquire(self) -> str | None:
        now = self._clock()
        self._held = {lease: expiry for lease, expiry in self._held.items() if expiry > now}
        if self.limit.max_concurrency and len(self._held) >= self.limit.max_concurrency:
            return None
        if self.limit.requests_per_second:
            rate = self.limit.requests_per_second
            self._tokens = min(max(1.0, rate), self._tokens + (now - self._refilled) * rate)
            self._refilled = now
            if self._tokens < 1.0:
                return None
            self._tokens -= 1.0
        lease = uuid.uuid4().hex
        self._held[lease] = now + self.limit.lease_ttl_s
        self.granted += 1
        return lease

    def release(self, lease: str) -> None:
        self._held.pop(lease, None)

    def stats(self) -> dict[str, Any]:
        return {"in_flight": len(self._held), "granted": self.granted, "refused": self.refused,
                "max_concurrency": self.limit.max_concurrency, "requests_per_second": self.limit.requests_per_second}


@ray.remote(num_cpus=0, max_restarts=-1)
class KeyLimiterActor:
    def __init__(self, limit: KeyLimit) -> None:
        self._leases = Leases(limit)
        self._freed = asyncio.Event()

    async def acquire(self) -> str | None:
        """A lease, waiting up to `max_wait_s` for one; None when none came."""
        deadline = time.monotonic() + self._leases.limit.max_wait_s
        while (lease := self._leases.try_acquire()) is None:
            left = deadline - time.monotonic()
            if left <= 0:
                self._leases.refused += 1
                return None
            self._freed.clear()
            try:  # a release wakes the waiters; the rate bucket refills on its own
                await asyncio.wait_for(self._freed.wait(), min(left, 0.05))
            except TimeoutError:
                pass
        return lease

    def release(self, lease: str) -> None:
        self._leases.release(lease)
        self._freed.set()

    def stats(self) -> dict[str, Any]:
        return self._leases.stats()


def limiter(variable: str, limit: KeyLimit, namespace: str) -> ray.actor.ActorHandle:
    return KeyLimiterActor.options(name=f"limits:key:{variable}", namespace=namespace, lifetime="detached",
                                   get_if_exists=True, max_concurrency=1000).remote(limit)


class KeyGate:
    """One key's leases, as the wrappers below use them."""

    def __init__(self, variable: str, limit: KeyLimit, namespace: str) -> None:
        self.variable = variable
        self._handle = limiter(variable, limit, namespace)

    @asynccontextmanager
    async def lease(self, stage: str) -> AsyncIterator[None]:
        lease = await self._handle.acquire.remote()
        if lease is None:
            raise ProviderError(f"{stage}.rate_limited",
                                f"the limit set for the key in ${self.variable} is reached (resilience.key_limits)")
        try:
            yield
        finally:
            self._handle.release.remote(lease)


class LimitedLLM(LLM):
    def __init__(self, inner: LLM, gate: KeyGate) -> None:
        self._inner, self._gate = inner, gate
        self.label = getattr(inner, "label", "llm")

    async def stream(self, messages: list[ChatMessage], tools: list[ToolSpec]) -> AsyncIterator[LLMChunk]:
        async with self._gate.lease("llm"), aclosing(self._inner.stream(messages, tools)) as chunks:
            async for chunk in chunks:
                yield chunk


class LimitedTTS(TTS):
    def __init__(self, inner: TTS, gate: KeyGate) -> None:
        self._inner, self._gate = inner, gate

    async def synthesize(self, text: str) -> AudioSegment:
        async with self._gate.lease("tts"):
            return await self._inner.synthesize(text)

    async def stream(self, text: str) -> AsyncIterator[AudioSegment]:
        async with self._gate.lease("tts"), aclosing(self._inner.stream(text)) as pieces:
            async for piece in pieces:
                yield piece


class LimitedSTT(STT):
    def __init__(self, inner: STT, gate: KeyGate) -> None:
        self._inner, self._gate = inner, gate

    async def transcribe(self, pcm16: bytes) -> str:
        async with self._gate.lease("stt"):
            return await self._inner.transcribe(pcm16)

    def open_stream(self, interim_every_s: float = 0.0) -> STTStreamSession:
        return _LimitedSTTStream(self._inner, self._gate, interim_every_s)


class _LimitedSTTStream(STTStreamSession):
    """Takes its lease with the first audio (opening is synchronous) and
    gives it back when the utterance ends, fails or is cancelled. No lease in
    time is the stream's failure, raised by `events()` like any other."""

    def __init__(self, inner: STT, gate: KeyGate, interim_every_s: float) -> None:
        self._inner, self._gate, self._every = inner, gate, interim_every_s
        self._stream: STTStreamSession | None = None
        self._refused: ProviderError | None = None
        self._lease: Any = None
        self._opening = asyncio.Lock()

    @property
    def live(self) -> bool:  # type: ignore[override]
        return bool(self._stream is not None and self._stream.live)

    async def _ensure(self) -> STTStreamSession:
        async with self._opening:
            if self._refused is not None:
                raise self._refused
            if self._stream is None:
                lease = self._gate.lease("stt")
                try:
                    await lease.__aenter__()
                except ProviderError as e:
                    self._refused = e
                    raise
                self._lease = lease
                self._stream = self._inner.open_stream(self._every)
            return self._stream

    async def _end(self) -> None:
        if self._lease is not None:
            lease, self._lease = self._lease, None
            await lease.__aexit__(None, None, None)

    async def push(self, pcm16: bytes) -> None:
        try:
            stream = await self._ensure()
        except ProviderError:
            return  # `events()` raises it
        await stream.push(pcm16)

    async def end_input(self) -> None:
        try:
            await (await self._ensure()).end_input()
        except ProviderError:
            return

    async def events(self) -> AsyncIterator[SpeechEvent]:
        try:
            async with aclosing((await self._ensure()).events()) as events:  # type: ignore[type-var]
                async for event in events:
                    yield event
        finally:
            await self._end()

    async def cancel(self) -> None:
        try:
            if self._stream is not None:
                await self._stream.cancel()
        finally:
            await self._end()

    async def speech_paused(self) -> None:
        if self._stream is not None:
            await self._stream.speech_paused()

    async def speech_resumed(self) -> None:
        if self._stream is not None:
            await self._stream.speech_resumed()


def limited(stage: str, provider: Any, variable: str | None, limits: dict[str, KeyLimit], namespace: str) -> Any:
    """The provider behind its key's gate when that key has limits; else as it is."""
    limit = limits.get(variable or "")
    if limit is None or not (limit.max_concurrency or limit.requests_per_second):
        return provider
    gate = KeyGate(str(variable), limit, namespace)
    wrapper = {"llm": LimitedLLM, "tts": LimitedTTS, "stt": LimitedSTT}[stage]
    return wrapper(provider, gate)
