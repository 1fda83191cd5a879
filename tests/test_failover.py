"""Failover chains and circuit breakers (providers/adapters), and the TTS
child's streamed sentence audio, without Ray: the adapters see only the
provider contracts, so small scripted providers drive them here. The same
chains against the real SDKs and their loopback fakes, through session
actors, are in test_cloud_faults.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest

from actors.providers.adapters.breaker import CircuitBreaker
from actors.providers.adapters.buffered_stt import BufferedSTTStream
from actors.providers.adapters.fallback import Chain, FallbackLLM, FallbackSTT, FallbackTTS, Link
from actors.providers.base import (
    LLM,
    STT,
    TTS,
    AudioSegment,
    ChatMessage,
    LLMChunk,
    ProviderError,
    QueuedSTTStream,
    SpeechEvent,
    ToolSpec,
)
from actors.tts_playback import SentenceAudio


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# ------------------------------------------------------------------ breaker
def test_breaker_opens_after_consecutive_failures_and_a_success_resets_the_count() -> None:
    b = CircuitBreaker("llm:x", failures=3, reset_s=10, clock=Clock())
    b.failure("a")
    b.failure("b")
    b.success()
    assert not b.failure("c") and not b.failure("d") and b.state == "closed"
    assert b.failure("e") and b.state == "open" and not b.allow()
    assert b.snapshot() == {"state": "open", "consecutive_failures": 3, "opened": 1, "last_error": "e"}


def test_breaker_lets_one_probe_through_after_the_reset_time() -> None:
    clock = Clock()
    b = CircuitBreaker("tts:x", failures=1, reset_s=10, clock=clock)
    b.failure()
    clock.now += 9.9
    assert not b.allow()
    clock.now += 0.2
    assert b.state == "half_open"
    assert b.allow() and not b.allow(), "one probe at a time"
    assert b.failure() and b.state == "open", "a failed probe opens it again"
    clock.now += 10
    assert b.allow()
    b.success()
    assert b.state == "closed" and b.allow() and b.allow()


# ------------------------------------------------------------------ scripted providers
class ScriptedLLM(LLM):
    """Answers with `text`, or raises `error` after sending `before` chunks."""

    def __init__(self, text: str = "", error: Exception | None = None, before: int = 0) -> None:
        self.text, self.error, self.before, self.calls = text, error, before, 0

    async def stream(self, messages: list[ChatMessage], tools: list[ToolSpec]) -> AsyncIterator[LLMChunk]:
        self.calls += 1
        for word in self.text.split()[: self.before if self.error else None]:
            yield LLMChunk(text=word + " ")
        if self.error:
            raise self.error


def chain_of(kind: str, *providers: Any, failures: int = 2, clock: Clock | None = None) -> tuple[Chain[Any], list[str]]:
    told: list[str] = []
    links = [Link(f"p{i}", (lambda p=p: p), CircuitBreaker(f"{kind}:p{i}", failures, 30, clock or Clock()))
             for i, p in enumerate(providers)]
    return Chain(kind, links, told.append), told


async def reply(llm: LLM) -> str:
    return "".join([c.text async for c in llm.stream([], [])])


async def test_llm_fails_over_before_any_text_and_says_so_once() -> None:
    primary = ScriptedLLM(error=ProviderError("llm.unavailable", "HTTP 503"))
    backup = ScriptedLLM("the backup answers")
    chain, told = chain_of("llm", primary, backup)
    assert await reply(FallbackLLM(chain)) == "the backup answers "
    assert told == ["language model: p0 failed (llm.unavailable: HTTP 503); using p1"]
    assert chain.served_by == "p1" and chain.links[0].breaker.snapshot()["consecutive_failures"] == 1


async def test_llm_never_fails_over_once_text_was_sent() -> None:
    primary = ScriptedLLM("one two three", error=ProviderError("llm.stream_error", "cut"), before=2)
    backup = ScriptedLLM("never heard")
    chain, told = chain_of("llm", primary, backup)
    got: list[str] = []
    with pytest.raises(ProviderError) as e:
        async for chunk in FallbackLLM(chain).stream([], []):
            got.append(chunk.text)
    assert got == ["one ", "two "] and backup.calls == 0 and told == []
    assert e.value.code == "llm.stream_error" and "every language model provider failed" in e.value.message


async def test_open_breaker_skips_the_provider_until_its_probe() -> None:
    clock = Clock()
    primary = ScriptedLLM(error=ProviderError("llm.rate_limited", "429"))
    backup = ScriptedLLM("local answer")
    chain, told = chain_of("llm", primary, backup, failures=2, clock=clock)
    llm = FallbackLLM(chain)
    for _ in range(4):
        assert await reply(llm) == "local answer "
    assert primary.calls == 2, "after two failures the breaker keeps calls away from it"
    assert told[:2] == ["language model: p0 failed (llm.rate_limited: 429); using p1"] * 2
    assert told[2:] == ["language model: p0 unavailable (circuit open after repeated failures); using p1"]
    primary.error, primary.text = None, "cloud is back"
    clock.now += 31
    assert await reply(llm) == "cloud is back " and primary.calls == 3
    assert chain.links[0].breaker.state == "closed" and chain.served_by == "p0"


async def test_a_one_link_chain_keeps_the_providers_own_error() -> None:
    error = ProviderError("llm.auth", "rejected the key in $OPENAI_API_KEY")
    chain, _ = chain_of("llm", ScriptedLLM(error=error), failures=1)
    llm = FallbackLLM(chain)
    for _ in range(2):  # an open breaker with nothing behind it is still tried
        with pytest.raises(ProviderError) as e:
            await reply(llm)
        assert e.value is error


async def test_unused_fallbacks_are_never_built() -> None:
    built: list[str] = []

    def make(name: str) -> LLM:
        built.append(name)
        return ScriptedLLM("hi")

    links = [Link(n, (lambda n=n: make(n)), CircuitBreaker(n)) for n in ("a", "b")]
    assert await reply(FallbackLLM(Chain("llm", links))) == "hi "
    assert built == ["a"]


class ScriptedSTT(STT):
    def __init__(self, text: str = "", error: ProviderError | None = None) -> None:
        self.text, self.error, self.heard = text, error, b""

    async def transcribe(self, pcm16: bytes) -> str:
        self.heard = pcm16
        if self.error:
            raise self.error
        return self.text


async def test_stt_stream_replays_the_whole_utterance_to_the_next_provider() -> None:
    primary = ScriptedSTT(error=ProviderError("stt.connection", "dropped"))
    backup = ScriptedSTT("what is twelve times seven")
    chain, told = chain_of("stt", primary, backup)
    stream = FallbackSTT(chain).open_stream()
    for k in range(5):
        await stream.push(bytes([k]) * 320)
    assert await stream.finish() == "what is twelve times seven"
    assert backup.heard == b"".join(bytes([k]) * 320 for k in range(5)), "the same audio, from the start"
    assert told == ["speech recognition: p0 failed (stt.connection: dropped); using p1"]


async def test_stt_stream_with_every_provider_failing_raises_the_last_error() -> None:
    chain, _ = chain_of("stt", ScriptedSTT(error=ProviderError("stt.timeout", "t")),
                        ScriptedSTT(error=ProviderError("stt.failed", "f")))
    stream = FallbackSTT(chain).open_stream()
    await stream.push(b"\0\0" * 160)
    with pytest.raises(ProviderError) as e:
        await stream.finish()
    assert e.value.code == "stt.failed"


class LiveSTT(STT):
    """A streaming recogniser: an interim per push, the words at the end;
    with `fail_after`, its stream fails (as a dropped connection does) after
    that many pushes, while the user is still speaking."""

    def __init__(self, words: str, fail_after: int | None = None) -> None:
        self.words, self.fail_after, self.pushed = words, fail_after, bytearray()

    async def transcribe(self, pcm16: bytes) -> str:
        return self.words

    def open_stream(self, interim_every_s: float = 0.0) -> _LiveStream:
        return _LiveStream(self)


class _LiveStream(QueuedSTTStream):
    live = True

    def __init__(self, stt: LiveSTT) -> None:
        super().__init__()
        self.stt, self.pushes = stt, 0

    async def push(self, pcm16: bytes) -> None:
        self.stt.pushed.extend(pcm16)
        self.pushes += 1
        if self.stt.fail_after is not None and self.pushes >= self.stt.fail_after:
            self._put_error(ProviderError("stt.connection", "dropped"))
        else:
            self._put(SpeechEvent("interim", f"{self.stt.words[:self.pushes]}"))

    async def end_input(self) -> None:
        self._put(SpeechEvent("end", self.stt.words))


async def test_stt_stream_fails_over_while_the_user_is_still_speaking() -> None:
    primary, backup = LiveSTT("primary", fail_after=2), LiveSTT("what is twelve times seven")
    chain, told = chain_of("stt", primary, backup)
    stream = FallbackSTT(chain).open_stream()
    seen: list[SpeechEvent] = []

    async def read() -> None:
        async for event in stream.events():
            seen.append(event)

    reader = asyncio.get_running_loop().create_task(read())
    await stream.push(b"\1\1")
    await stream.push(b"\2\2")  # the primary fails here
    for _ in range(50):
        if told:
            break
        await asyncio.sleep(0.01)
    assert told == ["speech recognition: p0 failed (stt.connection: dropped); using p1"], "before end of speech"
    await stream.push(b"\3\3")
    await stream.end_input()
    await asyncio.wait_for(reader, 2)
    assert bytes(backup.pushed) == b"\1\1\2\2\3\3", "the backup heard the whole utterance, in order"
    assert seen[-1] == SpeechEvent("end", "what is twelve times seven")
    assert chain.served_by == "p1"


async def test_buffered_stream_rations_interim_decodes_and_decodes_once_at_the_end() -> None:
    decoded: list[int] = []

    class CountingSTT(STT):
        async def transcribe(self, pcm16: bytes) -> str:
            decoded.append(len(pcm16))
            await asyncio.sleep(0.03)
            return f"{len(pcm16)} bytes"

    stream = CountingSTT().open_stream(interim_every_s=0.05)
    assert stream.live is False
    events: list[SpeechEvent] = []

    async def read() -> None:
        async for event in stream.events():
            events.append(event)

    reader = asyncio.get_running_loop().create_task(read())
    for _ in range(20):  # 20 pushes over ~0.2 s: a handful of interims, not 20
        await stream.push(b"\0" * 320)
        await asyncio.sleep(0.01)
    await stream.end_input()
    await asyncio.wait_for(reader, 2)
    interims = [e for e in events if e.kind == "interim"]
    assert 1 <= len(interims) <= 5, events
    assert events[-1] == SpeechEvent("end", "6400 bytes"), "the transcript is a decode of all the audio"
    assert len(decoded) <= len(interims) + 2, "each decode an interim, but one cut by the end, and the final"

    quiet = CountingSTT().open_stream()  # no interval: no interims, one decode
    decoded.clear()
    await quiet.push(b"\0" * 640)
    assert await quiet.finish() == "640 bytes" and decoded == [640]


def test_live_partials_follow_the_stream_in_use() -> None:
    chain, _ = chain_of("stt", ScriptedSTT("x"))
    assert BufferedSTTStream.live is False
    assert FallbackSTT(chain).open_stream().live is False


class ScriptedTTS(TTS):
    def __init__(self, pieces: int = 3, error: ProviderError | None = None, after: int = 0) -> None:
        self.pieces, self.error, self.after, self.closed = pieces, error, after, 0

    async def synthesize(self, text: str) -> AudioSegment:
        raise AssertionError("the chain streams")

    async def stream(self, text: str) -> AsyncIterator[AudioSegment]:
        try:
            for k in range(self.pieces):
                if self.error and k == self.after:
                    raise self.error
                yield AudioSegment(bytes([k + 1]) * 200, 16000)
                await asyncio.sleep(0)
        finally:
            self.closed += 1


async def test_tts_stream_fails_over_before_audio_but_not_after() -> None:
    chain, told = chain_of("tts", ScriptedTTS(error=ProviderError("tts.timeout", "slow")), ScriptedTTS(pieces=2))
    pieces = [p async for p in FallbackTTS(chain).stream("Hello.")]
    assert len(pieces) == 2 and told and "tts.timeout" in told[0]

    chain, told = chain_of("tts", ScriptedTTS(error=ProviderError("tts.connection", "drop"), after=1), ScriptedTTS())
    got = []
    with pytest.raises(ProviderError):
        async for p in FallbackTTS(chain).stream("Hello."):
            got.append(p)
    assert len(got) == 1 and told == [], "half a sentence is not said again in another voice"


async def test_closing_a_tts_chain_stream_closes_the_providers_stream() -> None:
    tts = ScriptedTTS(pieces=10)
    chain, _ = chain_of("tts", tts)
    stream = FallbackTTS(chain).stream("Hello.")
    await anext(stream)
    await stream.aclose()
    assert tts.closed == 1


# ------------------------------------------------------------------ the push-text TTS stream
async def test_tts_stream_speaks_flushed_segments_in_order_each_ended_by_a_final_piece() -> None:
    said: list[str] = []

    class Recording(ScriptedTTS):
        async def stream(self, text: str) -> AsyncIterator[AudioSegment]:
            said.append(text)
            async for piece in super().stream(text):
                yield piece

    stream = Recording(pieces=2).open_stream()
    stream.push_text("Twelve times ")
    stream.push_text("seven is eighty-four.")
    assert stream.flush() == 0
    stream.push_text("   ")  # nothing to say: no call, only its end
    assert stream.flush() == 1
    stream.push_text("Anything else?")
    stream.end_input()  # flushes the remainder as segment 2
    out = [p async for p in stream]
    assert said == ["Twelve times seven is eighty-four.", "Anything else?"]
    assert [(p.segment, p.final) for p in out] == [(0, False), (0, False), (0, True), (1, True),
                                                   (2, False), (2, False), (2, True)]
    assert all(p.error is None for p in out)
    with pytest.raises(RuntimeError):
        stream.push_text("too late")


async def test_tts_stream_a_failed_segment_ends_with_its_error_and_the_next_is_still_said() -> None:
    class FailsFirst(ScriptedTTS):
        async def stream(self, text: str) -> AsyncIterator[AudioSegment]:
            if text.startswith("bad"):
                raise ProviderError("tts.failed", "no voice")
            async for piece in super().stream(text):
                yield piece

    stream = FailsFirst(pieces=1).open_stream()
    stream.push_text("bad sentence.")
    stream.flush()
    stream.push_text("Good sentence.")
    stream.end_input()
    out = [p async for p in stream]
    assert [(p.segment, p.final, type(p.error).__name__) for p in out] == [
        (0, True, "ProviderError"), (1, False, "NoneType"), (1, True, "NoneType")]


async def test_cancelling_a_tts_stream_mid_sentence_closes_the_providers_stream() -> None:
    class Slow(ScriptedTTS):
        async def stream(self, text: str) -> AsyncIterator[AudioSegment]:
            try:
                for k in range(100):
                    yield AudioSegment(bytes([k % 250 + 1]) * 200, 16000)
                    await asyncio.sleep(0.01)
            finally:
                self.closed += 1

    tts = Slow()
    stream = tts.open_stream()
    stream.push_text("A long sentence.")
    stream.flush()
    got = []
    async for piece in stream:
        got.append(piece)
        if len(got) == 2:
            await stream.cancel()
    assert tts.closed == 1, "the provider's synthesis was closed, not left running"
    assert len(got) < 10 and not any(p.final for p in got), "cut mid-sentence: no end of it"


# ------------------------------------------------------------------ streamed sentence audio
@pytest.mark.parametrize("src, dst", [(22050, 16000), (24000, 48000), (16000, 16000), (22050, 8000)])
async def test_streamed_sentence_chunks_join_like_one_resampling(src: int, dst: int) -> None:
    """Pieces of any size in, 120 ms chunks out: the chunks at any rate are
    the whole sentence resampled on one grid (no seams), and every rate gets
    the same number of chunks covering the same time."""
    rng = np.random.default_rng(1)
    pcm = (np.sin(np.arange(int(src * 1.37)) * 2 * np.pi * 220 / src) * 12000).astype(np.int16).tobytes()
    audio = SentenceAudio(chunk_ms=120)
    cut = 0
    chunks: list[bytes] = []
    k = 0
    while cut < len(pcm):
        step = int(rng.integers(1, 4000)) * 2
        audio.append(AudioSegment(pcm[cut:cut + step], src))
        cut += step
        while audio.ready(k):
            chunks.append(audio.chunk(dst, k))
            k += 1
    audio.finish()
    while await audio.wait_chunk(k):
        chunks.append(audio.chunk(dst, k))
        k += 1
    assert k == int(np.ceil(1.37 * 1000 / 120))
    joined = np.frombuffer(b"".join(chunks), dtype=np.int16).astype(np.float64)
    source = np.frombuffer(pcm, dtype=np.int16).astype(np.float64)
    expected = np.interp(np.arange(round(len(source) * dst / src)) * src / dst, np.arange(len(source)), source)
    assert len(joined) == len(expected)
    assert np.max(np.abs(joined - expected)) <= 1.0
    assert sum(audio.chunk_duration_ms(i) for i in range(k)) == pytest.approx(audio.duration_ms)


async def test_a_sentence_without_audio_has_no_chunks() -> None:
    audio = SentenceAudio(chunk_ms=120)
    waiter = asyncio.get_running_loop().create_task(audio.wait_chunk(0))
    await asyncio.sleep(0)
    audio.finish(ProviderError("tts.failed", "x"))
    assert await waiter is False and audio.error is not None


# ------------------------------------------------------------------ per-key limits (bookkeeping)
def test_key_leases_cap_concurrency_and_rate_and_expire() -> None:
    from actors.config import KeyLimit
    from actors.providers.adapters.key_limits import Leases

    clock = Clock()
    leases = Leases(KeyLimit(max_concurrency=2, lease_ttl_s=10), clock)
    a, b = leases.try_acquire(), leases.try_acquire()
    assert a and b and leases.try_acquire() is None
    leases.release(a)
    assert leases.try_acquire() is not None
    clock.now += 11  # the holders died without releasing: their leases expire
    assert leases.try_acquire() is not None and leases.stats()["in_flight"] == 1

    rate = Leases(KeyLimit(requests_per_second=2), clock)
    assert rate.try_acquire() and rate.try_acquire() and rate.try_acquire() is None
    clock.now += 0.5
    assert rate.try_acquire() and rate.try_acquire() is None


async def test_a_turns_later_rounds_keep_the_provider_that_answered() -> None:
    primary = ScriptedLLM(error=ProviderError("llm.timeout", "slow"))
    backup = ScriptedLLM("from the backup")
    chain, told = chain_of("llm", primary, backup, failures=5)
    turn = FallbackLLM(chain).for_turn()
    for _ in range(3):  # three tool rounds of one turn
        assert "".join([c.text async for c in turn.stream([], [])]) == "from the backup "
    assert primary.calls == 1 and len(told) == 1
    assert await reply(FallbackLLM(chain)) == "from the backup " and primary.calls == 2, "a new turn asks again"


async def test_buffered_stream_decodes_at_a_pause_and_uses_it_when_the_utterance_ends_there() -> None:
    heard: list[bytes] = []

    class Whisperish(STT):
        async def transcribe(self, pcm16: bytes) -> str:
            heard.append(pcm16)
            await asyncio.sleep(0.05)
            return f"{len(pcm16.rstrip(ZERO))} bytes of speech"

    stream = Whisperish().open_stream()
    assert isinstance(stream, BufferedSTTStream)
    events: list[SpeechEvent] = []
    reader = asyncio.get_running_loop().create_task(_read_all(stream, events))
    await stream.push(b"\1" * 640)
    await stream.speech_paused()  # decoding starts now, during the end-silence wait
    await stream.push(b"\0" * 640)  # the silence that decides the end
    for _ in range(100):  # the pause's decode goes out as an interim (a reply may start on it)
        if events:
            break
        await asyncio.sleep(0.01)
    await stream.end_input()
    await asyncio.wait_for(reader, 2)
    assert heard == [b"\1" * 640], "one decode, of the audio up to the pause"
    assert events == [SpeechEvent("interim", "640 bytes of speech"), SpeechEvent("end", "640 bytes of speech")]
    assert stream.decodes == {"interim": 0, "at_pause": 1, "at_pause_used": 1, "final": 0}

    heard.clear()
    resumed = Whisperish().open_stream()
    await resumed.push(b"\1" * 640)
    await resumed.speech_paused()
    await resumed.speech_resumed()  # the speaker went on: the pause's decode is stale
    await resumed.push(b"\2" * 640)
    assert await resumed.finish() == "1280 bytes of speech"
    assert heard[-1] == b"\1" * 640 + b"\2" * 640 and resumed.decodes["final"] == 1


ZERO = bytes(1)


async def _read_all(stream: Any, into: list[SpeechEvent]) -> None:
    async for event in stream.events():
        into.append(event)


# ------------------------------------------------------------------ retry wrappers
async def test_retry_wrappers_retry_retryable_failures_only_and_never_after_audio() -> None:
    from actors.providers.adapters.retry import RetryPolicy, RetrySTT, RetryTTS

    policy = RetryPolicy(retries=3, backoff_s=0.001, max_backoff_s=0.002)

    class Flaky(STT):
        calls = 0

        async def transcribe(self, pcm16: bytes) -> str:
            self.calls += 1
            if self.calls < 3:
                raise ProviderError("stt.unavailable", "503", retryable=True)
            return "twelve times seven"

    flaky = Flaky()
    assert await RetrySTT(flaky, policy).transcribe(b"\0\0") == "twelve times seven" and flaky.calls == 3

    refused = ScriptedTTS(error=ProviderError("tts.auth", "bad key"))
    with pytest.raises(ProviderError, match="bad key"):
        [p async for p in RetryTTS(refused, policy).stream("Hello.")]
    assert refused.closed == 1, "not retryable: tried once"

    cut = ScriptedTTS(error=ProviderError("tts.connection", "drop", retryable=True), after=1)
    got = []
    with pytest.raises(ProviderError):
        async for piece in RetryTTS(cut, policy).stream("Hello."):
            got.append(piece)
    assert len(got) == 1 and cut.closed == 1, "audio was heard: no second try"
