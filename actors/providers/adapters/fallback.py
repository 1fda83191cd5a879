"""Failover chains: a stage's providers tried in order, each behind its
circuit breaker (`stt.fallback`, `llm.fallback`, `tts.fallback`).

A chain fails over only while nothing has reached the listener: an LLM reply
that already streamed text, or a sentence that already sent audio, is never
restarted on another provider (the user would hear it twice). Speech
recognition keeps the utterance's audio, so a recogniser that drops mid
utterance is replaced by the next one with the same audio.

Every failover is said once to whoever listens (`Chain.notify`, the session's
`provider.failover` error event) and logged with its cause; later providers
are built only when first needed, so an unused fallback costs nothing.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import aclosing
from typing import Any, Generic, TypeVar

from actors.providers.adapters.breaker import CircuitBreaker, breaker_for
from actors.providers.adapters.usage import ProviderUsage, usage_for
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

log = logging.getLogger(__name__)

P = TypeVar("P")
T = TypeVar("T")

STAGE_WORDS = {"stt": "speech recognition", "llm": "language model", "tts": "speech synthesis"}


def describe(error: BaseException) -> str:
    """`code: message` for a provider's error, the type for anything else
    (an SDK's own exception text may quote request details)."""
    if isinstance(error, ProviderError):
        return f"{error.code}: {error.message}"
    return type(error).__name__


class Link(Generic[P]):
    """One provider of a chain, built on first use."""

    def __init__(self, name: str, make: Callable[[], P], breaker: CircuitBreaker,
                 usage: ProviderUsage | None = None) -> None:
        self.name = name
        self._make = make
        self._provider: P | None = None
        self.breaker = breaker
        self.usage = usage or ProviderUsage()
        """Calls, in flight, failures, durations: this process's, for the control panel."""

    @property
    def provider(self) -> P:
        if self._provider is None:
            self._provider = self._make()
        return self._provider


class Chain(Generic[P]):
    """The order, the breakers and the telling; the adapters below do the calls."""

    def __init__(self, kind: str, links: list[Link[P]], notify: Callable[[str], None] | None = None) -> None:
        if not links:
            raise ValueError("a chain needs at least one provider")
        self.kind = kind
        self.links = links
        self.notify = notify
        """Told, in words, each time the chain moves past a provider."""
        self.served_by: str | None = None
        """The provider that answered the last successful call."""
        self.failovers = 0
        self._pending: tuple[str, str] | None = None
        self._told_open: set[str] = set()

    def attempts(self, start: int = 0) -> Iterator[Link[P]]:
        """Links to try, in order from `start`, asking each breaker only when
        its turn comes (asking claims a half-open breaker's probe). When every
        breaker is open, every link is tried anyway: refusing outright helps no one."""
        skipped: list[str] = []
        tried = False
        for link in self.links[start:]:
            if not link.breaker.allow():
                skipped.append(link.name)
                continue
            if link is not self.links[0]:
                self._announce(link, skipped)
            tried = True
            yield from self._in_use(link)
        if not tried:
            for link in self.links[start:]:
                yield from self._in_use(link)

    @staticmethod
    def _in_use(link: Link[P]) -> Iterator[Link[P]]:
        """The link, counted in flight until its caller asks for the next one
        or drops the attempts (a return, an error, a cancelled stream: the
        generator is closed and `finally` runs)."""
        started = link.usage.begin()
        try:
            yield link
        finally:
            link.usage.end(started)

    def _announce(self, link: Link[P], skipped: list[str]) -> None:
        words = STAGE_WORDS.get(self.kind, self.kind)
        if self._pending is not None:
            name, why = self._pending
            message = f"{words}: {name} failed ({why}); using {link.name}"
        elif fresh := [n for n in skipped if n not in self._told_open]:
            self._told_open.update(fresh)
            message = f"{words}: {', '.join(fresh)} unavailable (circuit open after repeated failures); using {link.name}"
        else:
            return
        self._pending = None
        self.failovers += 1
        log.warning("%s", message)
        if self.notify is not None:
            self.notify(message)

    def succeeded(self, link: Link[P]) -> None:
        link.breaker.success()
        self._told_open.discard(link.name)
        self._pending = None
        self.served_by = link.name

    def failed(self, link: Link[P], error: BaseException) -> None:
        """Counted against its breaker and logged with the traceback; said to
        the listener when (and if) the next provider takes over."""
        why = describe(error)
        link.usage.failure()
        if link.breaker.failure(why):
            log.warning("%s provider %s: circuit opened after repeated failures (last: %s)", self.kind, link.name, why)
        log.warning("%s provider %s failed: %s", self.kind, link.name, why,
                    exc_info=(type(error), error, error.__traceback__))
        self._pending = (link.name, why)

    async def first(self, call: Callable[[P], Awaitable[T]]) -> T:
        """`call` on each provider in turn until one answers (a whole answer:
        nothing partial has reached anyone, so any failure may fail over)."""
        last: BaseException | None = None
        for link in self.attempts():
            try:
                result = await call(link.provider)
            except Exception as e:
                self.failed(link, e)
                last = e
                continue
            self.succeeded(link)
            return result
        assert last is not None
        raise self.give_up(last)

    def give_up(self, error: BaseException) -> ProviderError:
        """The error once every provider failed: the provider's own when the
        chain has one, so its stable code reaches the client unchanged."""
        self._pending = None
        code = error.code if isinstance(error, ProviderError) else f"{self.kind}.failed"
        if len(self.links) == 1 and isinstance(error, ProviderError):
            return error
        words = STAGE_WORDS.get(self.kind, self.kind)
        return ProviderError(code, f"every {words} provider failed; last: {describe(error)}")


def build_chain(kind: str, names: list[str], make: Callable[[str], Any], resilience: Any) -> Chain[Any]:
    """A chain of the named providers, each behind this process's breaker for it."""
    links = [Link(name, (lambda n=name: make(n)), breaker_for(kind, name, resilience.breaker_failures,
                                                              resilience.breaker_reset_s), usage_for(kind, name))
             for name in names]
    links[0].provider  # the primary is built now, as a lone provider would be: not by the first reply
    return Chain(kind, links)


# ------------------------------------------------------------------ STT
class FallbackSTT(STT):
    def __init__(self, chain: Chain[STT], max_replay_bytes: int = 30 * 16000 * 2) -> None:
        self.chain = chain
        self._max_replay = max_replay_bytes

    async def transcribe(self, pcm16: bytes) -> str:
        return await self.chain.first(lambda stt: stt.transcribe(pcm16))

    def open_stream(self, interim_every_s: float = 0.0) -> STTStreamSession:
        return _FallbackSTTStream(self.chain, self._max_replay, interim_every_s)


class _FallbackSTTStream(STTStreamSession):
    """Streams to the first provider and keeps the utterance's audio, so a
    provider that fails (a dropped connection, a task-failed) is replaced by
    the next one, given the same audio from the start, at the moment its
    stream reports the failure (while the user may still be speaking)."""

    def __init__(self, chain: Chain[STT], max_replay_bytes: int, interim_every_s: float) -> None:
        self._chain = chain
        self._attempts = chain.attempts()
        self._audio = bytearray()
        self._max_replay = max_replay_bytes
        self._every = interim_every_s
        self._ended = False
        self._cancelled = False
        self._push_error: BaseException | None = None
        self._link: Link[STT] | None = None
        self._stream: STTStreamSession | None = None
        self._open_next()

    @property
    def live(self) -> bool:  # type: ignore[override]
        return bool(self._stream is not None and self._stream.live)

    @property
    def decodes(self) -> dict[str, int] | None:
        """The batch adapter's decode counts, when the stream in use has them."""
        return getattr(self._stream, "decodes", None)

    def _open_next(self) -> bool:
        """The next provider's stream; False when the chain is exhausted."""
        while (link := next(self._attempts, None)) is not None:
            try:
                self._stream, self._link = link.provider.open_stream(self._every), link
                return True
            except Exception as e:
                self._chain.failed(link, e)
        self._stream = self._link = None
        return False

    async def _replace(self, error: BaseException) -> None:
        """The next provider, given the audio so far (and the end of input
        if it came); raises the chain's error when none is left."""
        assert self._link is not None and self._stream is not None
        self._chain.failed(self._link, error)
        await self._stream.cancel()
        with_audio = bytes(self._audio)
        while self._open_next():
            assert self._stream is not None and self._link is not None
            try:
                await self._stream.push(with_audio)
                if self._ended:
                    await self._stream.end_input()
                return
            except Exception as e:
                self._chain.failed(self._link, e)
        raise self._chain.give_up(error)

    async def push(self, pcm16: bytes) -> None:
        if len(self._audio) < self._max_replay:
            self._audio.extend(pcm16)
        if self._stream is None or self._push_error is not None:
            return
        try:
            await self._stream.push(pcm16)
        except Exception as e:  # replaced by `events()`, which reports failures
            self._push_error = e

    async def end_input(self) -> None:
        self._ended = True
        if self._stream is not None and self._push_error is None:
            await self._stream.end_input()

    async def events(self) -> AsyncIterator[SpeechEvent]:
        while self._stream is not None and not self._cancelled:
            stream, link = self._stream, self._link
            assert link is not None
            try:
                if self._push_error is not None:
                    error, self._push_error = self._push_error, None
                    raise error
                async for event in stream.events():
                    if event.kind == "end":
                        self._chain.succeeded(link)
                        self._attempts.close()  # its call ends here, not when the stream is dropped
                    yield event
                    if event.kind == "end":
                        return
                if self._cancelled:
                    return
                raise ProviderError("stt.failed", f"{link.name} ended the utterance without a transcript")
            except Exception as e:
                if self._cancelled:
                    return
                await self._replace(e)  # raises when no provider is left
        if not self._cancelled:
            raise ProviderError("stt.failed", "no speech recognition provider could be opened")

    async def cancel(self) -> None:
        self._cancelled = True
        self._attempts.close()
        if self._stream is not None:
            await self._stream.cancel()

    async def speech_paused(self) -> None:
        if self._stream is not None and self._push_error is None:
            await self._stream.speech_paused()

    async def speech_resumed(self) -> None:
        if self._stream is not None and self._push_error is None:
            await self._stream.speech_resumed()


# ------------------------------------------------------------------ LLM
class FallbackLLM(LLM):
    label = "fallback"

    def __init__(self, chain: Chain[LLM], start: int = 0) -> None:
        self.chain = chain
        self._start = start
        self.answered_by: int | None = None
        """Index of the link that answered this object's last stream."""

    def for_turn(self) -> FallbackLLM:
        """A view for one turn's rounds (tool calls feed the next round): once
        a provider answered, later rounds start with it, so a failed primary
        is not waited for again within the turn."""
        return _TurnLLM(self.chain)

    async def stream(self, messages: list[ChatMessage], tools: list[ToolSpec]) -> AsyncIterator[LLMChunk]:
        last: BaseException | None = None
        for link in self.chain.attempts(self._start):
            answered = False
            try:
                async with aclosing(link.provider.stream(messages, tools)) as chunks:  # type: ignore[type-var]
                    async for chunk in chunks:
                        answered = answered or bool(chunk.text or chunk.tool_call)
                        yield chunk
            except Exception as e:
                self.chain.failed(link, e)
                if answered:  # the listener has part of this reply: no second answer on top
                    raise self.chain.give_up(e)
                last = e
                continue
            self.chain.succeeded(link)
            self.answered_by = self.chain.links.index(link)
            return
        assert last is not None
        raise self.chain.give_up(last)


class _TurnLLM(FallbackLLM):
    async def stream(self, messages: list[ChatMessage], tools: list[ToolSpec]) -> AsyncIterator[LLMChunk]:
        async with aclosing(super().stream(messages, tools)) as chunks:
            async for chunk in chunks:
                yield chunk
        if self.answered_by is not None:
            self._start = self.answered_by


# ------------------------------------------------------------------ TTS
class FallbackTTS(TTS):
    def __init__(self, chain: Chain[TTS]) -> None:
        self.chain = chain

    async def synthesize(self, text: str) -> AudioSegment:
        return await self.chain.first(lambda tts: tts.synthesize(text))

    async def stream(self, text: str) -> AsyncIterator[AudioSegment]:
        last: BaseException | None = None
        for link in self.chain.attempts():
            sent = False
            try:
                async with aclosing(link.provider.stream(text)) as pieces:
                    async for piece in pieces:
                        sent = True
                        yield piece
            except Exception as e:
                self.chain.failed(link, e)
                if sent:  # part of the sentence was heard: do not say it again in another voice
                    raise self.chain.give_up(e)
                last = e
                continue
            self.chain.succeeded(link)
            return
        assert last is not None
        raise self.chain.give_up(last)
