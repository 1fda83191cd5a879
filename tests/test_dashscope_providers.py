"""DashScope STT (paraformer-realtime) and TTS (CosyVoice) providers against
the loopback fake: the real, unmodified SDK on both sides of a real socket.
Pure asyncio, no Ray."""

from __future__ import annotations

import asyncio
import importlib
import threading
import time
from collections.abc import Iterator
from contextlib import aclosing
from types import SimpleNamespace

import pytest

from actors.providers.base import ProviderError, STTStreamSession
from actors.providers.dashscope.stt import DashScopeSTT, DashScopeSTTConfig, join_sentences
from actors.providers.dashscope.tts import DashScopeTTS, DashScopeTTSConfig
from tests.fakes.dashscope_server import AsrScript, FakeDashScope, Fault, TtsScript, expected_tts_bytes

KEY = "sk-test-0123456789"
KEY_ENV = "VA_TEST_DASHSCOPE_KEY"
FRAME = 3200  # 100 ms of PCM16 at 16 kHz


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeDashScope]:
    for module in ("dashscope.audio.asr", "dashscope.audio.tts_v2"):  # ~2 s: keep it out of timed tests
        importlib.import_module(module)

    with FakeDashScope(api_key=KEY) as server:
        yield server


@pytest.fixture(autouse=True)
def _clean(fake: FakeDashScope, monkeypatch: pytest.MonkeyPatch) -> None:
    fake.reset()
    monkeypatch.setenv(KEY_ENV, KEY)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


def stt_for(fake: FakeDashScope, **overrides: object) -> DashScopeSTT:
    return DashScopeSTT(DashScopeSTTConfig.model_validate(
        {"websocket_url": fake.url, "api_key_env": KEY_ENV, "timeout_s": 5, **overrides}))


def tts_for(fake: FakeDashScope, **overrides: object) -> DashScopeTTS:
    return DashScopeTTS(DashScopeTTSConfig.model_validate(
        {"websocket_url": fake.url, "api_key_env": KEY_ENV, **overrides}))


def frames(n: int) -> list[bytes]:
    """Distinct frames, so order on the wire is checkable."""
    return [bytes([i % 251 + 1]) * FRAME for i in range(n)]


async def stream_frames(stream: STTStreamSession, sent: list[bytes], every_s: float = 0.02) -> list[str]:
    """Push frames in (faster than) real time like the session does while a
    task reads the stream's events; returns the interim/final texts seen so
    far, in order. (The SDK only reads results while audio flows: its sender
    polls with time.sleep on its own event loop, so a result shows up a
    frame or two later.) The reader keeps running: `finish_reading` ends it."""
    seen: list[str] = []

    async def read() -> str:
        async for event in stream.events():
            if event.kind == "end":
                return event.text
            seen.append(event.text)
        raise AssertionError("the stream ended without an end event")

    READERS[id(stream)] = asyncio.get_running_loop().create_task(read())
    for frame in sent:
        await stream.push(frame)
        await asyncio.sleep(every_s)
    return seen


READERS: dict[int, asyncio.Task[str]] = {}


async def finish_reading(stream: STTStreamSession) -> str:
    """End the input of a stream `stream_frames` fed; → its transcript."""
    await stream.end_input()
    return await READERS.pop(id(stream))


def silence_timers(stream: STTStreamSession) -> list[threading.Timer]:
    """Live `Recognition.SILENCE_TIMEOUT_S` timers of this stream's recognition."""
    rec = getattr(stream, "_recognition", None)
    return [t for t in threading.enumerate() if isinstance(t, threading.Timer) and t.is_alive()
            and getattr(t.function, "__self__", None) is rec]


# ------------------------------------------------------------------ STT
async def test_stt_streams_audio_as_pushed_with_partials_and_final(fake: FakeDashScope) -> None:
    fake.asr = AsrScript(sentences=["what is twelve times seven"], interims_per_sentence=3)
    stream = stt_for(fake).open_stream()
    sent = frames(8)
    partials = await stream_frames(stream, sent)
    task = fake.last_task("asr")
    assert task is not None
    assert await fake.until(lambda: task.audio_frames == sent), "audio reaches the service as pushed"
    assert not task.finish_requested
    expected = ["what is", "what is twelve", "what is twelve times"]
    assert partials and partials[-1] == expected[-1], partials
    assert partials == [p for p in expected if p in partials], "interims arrive in order, each once"
    assert await finish_reading(stream) == "what is twelve times seven"
    assert partials[-1] == "what is twelve times seven", "the closed sentence came as a final event before the end"
    assert task.finish_requested and task.finished


async def test_stt_run_task_parameters_and_key_header(fake: FakeDashScope) -> None:
    stt = stt_for(fake, language_hints=["en"], max_sentence_silence=400, semantic_punctuation_enabled=True,
                  vocabulary_id="vocab-123", heartbeat=True, parameters={"disfluency_removal_enabled": True})
    assert await stt.transcribe(b"\x01\x00" * 16000) == "what is twelve times seven"
    task = fake.last_task("asr")
    assert task is not None
    assert task.model == "paraformer-realtime-v2"
    assert task.run_task["header"]["streaming"] == "duplex"
    assert task.run_task["payload"]["function"] == "recognition"
    assert task.parameters == {"sample_rate": 16000, "format": "pcm", "language_hints": ["en"],
                               "max_sentence_silence": 400, "semantic_punctuation_enabled": True,
                               "vocabulary_id": "vocab-123", "heartbeat": True,
                               "disfluency_removal_enabled": True}
    assert [len(f) for f in task.audio_frames] == [FRAME] * 10, "transcribe sends 100 ms frames"
    assert fake.connections[-1].headers["Authorization"] == f"Bearer {KEY}"


async def test_stt_audio_before_task_started_is_queued_in_order(fake: FakeDashScope) -> None:
    fake.asr = AsrScript(start_delay_s=0.3)
    stream = stt_for(fake).open_stream()
    sent = frames(4)
    for frame in sent:
        await stream.push(frame)
    assert await stream.finish() == "what is twelve times seven"
    task = fake.last_task("asr")
    assert task is not None and task.audio_frames == sent


async def test_stt_several_chinese_sentences_concatenate(fake: FakeDashScope) -> None:
    fake.asr = AsrScript(sentences=["你好。", "十二乘以七等于多少？"], interims_per_sentence=1)
    stream = stt_for(fake).open_stream()
    partials = await stream_frames(stream, frames(6))  # interim 1, final 1, interim 2, then nothing new
    assert partials[-1] == "你好。十二乘以七", partials
    assert "你好。" in partials, "the first sentence's final event carries it alone"
    assert await finish_reading(stream) == "你好。十二乘以七等于多少？"


async def test_stt_task_failed_is_a_provider_error(fake: FakeDashScope) -> None:
    fake.asr = AsrScript(fault=Fault("fail", after=2, code="InvalidParameter", message="bad audio"))
    stream = stt_for(fake).open_stream()
    for frame in frames(4):
        await stream.push(frame)
    with pytest.raises(ProviderError) as err:
        await stream.finish()
    assert err.value.code == "stt.task_failed"
    assert "InvalidParameter" in err.value.message and "bad audio" in err.value.message
    assert await fake.until(lambda: not silence_timers(stream), 2), "the SDK's 23 s silence timer is cancelled"


async def test_stt_drop_mid_utterance_then_a_new_stream_works(fake: FakeDashScope) -> None:
    fake.asr = AsrScript(fault=Fault("drop", after=2))
    stt = stt_for(fake)
    stream = stt.open_stream()
    for frame in frames(3):
        await stream.push(frame)
    started = time.monotonic()
    with pytest.raises(ProviderError) as err:
        await stream.finish()
    assert err.value.code == "stt.connection"
    assert time.monotonic() - started < 2, "a drop is reported at once, not after the timeout"
    fake.asr = AsrScript()
    assert await stt.transcribe(b"\0" * FRAME * 3) == "what is twelve times seven"


async def test_stt_stall_times_out(fake: FakeDashScope) -> None:
    fake.asr = AsrScript(fault=Fault("stall", after=1))
    stream = stt_for(fake, timeout_s=0.5).open_stream()
    await stream.push(b"\0" * FRAME)
    started = time.monotonic()
    with pytest.raises(ProviderError) as err:
        await stream.finish()
    assert err.value.code == "stt.timeout"
    assert time.monotonic() - started < 1.5


async def test_stt_missing_key_names_the_variable(fake: FakeDashScope, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV)
    stt = stt_for(fake)
    stream = stt.open_stream()  # never raises: the session's child opens streams outside its error handling
    await stream.push(b"\0" * FRAME)
    with pytest.raises(ProviderError) as err:
        await anext(stream.events())  # the failure comes out of the events at once, not at end of speech
    assert err.value.code == "stt.no_api_key" and KEY_ENV in err.value.message
    with pytest.raises(ProviderError, match=KEY_ENV):
        await stt.transcribe(b"\0" * FRAME)
    assert fake.connections == []


async def test_stt_rejected_key(fake: FakeDashScope, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-wrong")
    with pytest.raises(ProviderError) as err:
        await stt_for(fake).transcribe(b"\0" * FRAME)
    assert err.value.code == "stt.auth" and "sk-wrong" not in err.value.message
    assert fake.connections[-1].rejected == 401


async def test_stt_cancel_returns_at_once_and_ends_the_task(fake: FakeDashScope) -> None:
    fake.asr = AsrScript(final_delay_s=1.0)
    stream = stt_for(fake).open_stream()
    await stream.push(b"\0" * FRAME)
    await fake.until(lambda: fake.last_task("asr") is not None and bool(fake.last_task("asr").audio_frames))  # type: ignore[union-attr]
    started = time.monotonic()
    await stream.cancel()
    assert time.monotonic() - started < 0.05, "cancel does not wait for results"
    assert await fake.until(lambda: fake.last_task("asr").finish_requested, 2)  # type: ignore[union-attr]
    await stream.push(b"\0" * FRAME)  # late audio after cancel is ignored, not an error


def test_stt_config_from_app_config() -> None:
    assert DashScopeSTT.from_app_config(SimpleNamespace(stt=SimpleNamespace())).config == DashScopeSTTConfig()
    app = SimpleNamespace(stt=SimpleNamespace(dashscope={"model": "paraformer-realtime-8k-v2", "sample_rate": 8000}))
    assert DashScopeSTT.from_app_config(app).config.sample_rate == 8000
    assert DashScopeSTT(app).config.model == "paraformer-realtime-8k-v2", "plug-in path: Class(app_config)"
    assert join_sentences(["Hello.", "How are you?", "你好。", "再见。"]) == "Hello. How are you?你好。再见。"


# ------------------------------------------------------------------ TTS
async def test_tts_synthesize_returns_audio_at_the_configured_rate(fake: FakeDashScope) -> None:
    text = "Twelve times seven is eighty-four."
    segment = await tts_for(fake, sample_rate=24000, voice="longanyang", volume=60, speech_rate=1.2,
                            pitch=0.9).synthesize(text)
    assert segment.sample_rate == 24000
    assert len(segment.pcm16) == expected_tts_bytes(text, 24000)
    assert abs(len(segment.pcm16) / 2 / 24000 - len(text) * 0.05) < 0.01
    task = fake.last_task("tts")
    assert task is not None and task.texts == [text] and task.finished
    assert task.model == "cosyvoice-v2"
    params = task.parameters
    assert (params["voice"], params["format"], params["sample_rate"]) == ("longanyang", "pcm", 24000)
    assert (params["volume"], params["rate"], params["pitch"]) == (60, 1.2, 0.9)
    assert fake.connections[-1].headers["Authorization"] == f"Bearer {KEY}"


async def test_tts_stream_yields_chunks_before_the_text_is_done(fake: FakeDashScope) -> None:
    fake.tts = TtsScript(chunk_delay_s=0.03)
    text = "This sentence takes a little while to say."  # 2.1 s of audio in 100 ms chunks
    chunks = []
    async with aclosing(tts_for(fake).stream(text)) as stream:
        async for chunk in stream:
            if not chunks:
                task = fake.last_task("tts")
                assert task is not None and not task.finished, "first audio arrives mid-synthesis"
            assert chunk.sample_rate == 22050
            chunks.append(chunk.pcm16)
    assert len(chunks) == 21
    assert sum(map(len, chunks)) == expected_tts_bytes(text, 22050)


async def test_tts_closing_the_stream_cancels_the_task_quickly(fake: FakeDashScope) -> None:
    fake.tts = TtsScript(chunk_delay_s=0.05)
    got = 0
    async with aclosing(tts_for(fake).stream("A long reply that the user will interrupt.")) as stream:
        async for _ in stream:
            got += 1
            if got == 2:
                break
        started = time.monotonic()
    assert time.monotonic() - started < 0.05, "barge-in never waits on the service"
    task = fake.last_task("tts")
    assert task is not None
    assert await fake.until(lambda: task.cancelled or task.client_closed_early, 1)
    stop_seen = task.cancelled_at or task.closed_at
    assert stop_seen is not None and task.chunks_sent_after(stop_seen) <= 1
    assert task.chunks_sent < 10, "synthesis stopped, it did not run to the end"


async def test_tts_stall_is_a_timeout(fake: FakeDashScope) -> None:
    fake.tts = TtsScript(fault=Fault("stall", after=0))
    started = time.monotonic()
    with pytest.raises(ProviderError) as err:
        await tts_for(fake, first_audio_timeout_s=0.5).synthesize("hello")
    assert err.value.code == "tts.timeout"
    assert time.monotonic() - started < 1.5
    task = fake.last_task("tts")
    assert task is not None
    assert await fake.until(lambda: task.cancelled or task.client_closed_early, 2), "the stalled task is abandoned"


@pytest.mark.parametrize("fault", [Fault("fail", before_start=True, code="InvalidParameter", message="bad voice"),
                                   Fault("fail", after=2, code="InternalError", message="boom")])
async def test_tts_task_failed(fake: FakeDashScope, fault: Fault) -> None:
    fake.tts = TtsScript(fault=fault)
    with pytest.raises(ProviderError) as err:
        await tts_for(fake).synthesize("Hello there, how are you today?")
    assert err.value.code == "tts.task_failed" and fault.code in err.value.message


async def test_tts_connection_drop_is_reported_at_once(fake: FakeDashScope) -> None:
    fake.tts = TtsScript(fault=Fault("drop", after=2))
    started = time.monotonic()
    with pytest.raises(ProviderError) as err:
        await tts_for(fake).synthesize("Hello there, how are you today?")
    assert err.value.code == "tts.connection"
    assert time.monotonic() - started < 1.5


async def test_tts_missing_and_rejected_key(fake: FakeDashScope, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(ProviderError) as err:
        await tts_for(fake).synthesize("hello")
    assert err.value.code == "tts.no_api_key" and KEY_ENV in err.value.message
    assert fake.connections == []
    monkeypatch.setenv(KEY_ENV, "sk-wrong")
    with pytest.raises(ProviderError) as err:
        await tts_for(fake).synthesize("hello")
    assert err.value.code == "tts.auth" and "sk-wrong" not in err.value.message


async def test_tts_leaves_no_sdk_threads_behind(fake: FakeDashScope) -> None:
    """websocket-client's reader thread used to stay blocked in select() after
    the SDK's close() on ~1 task in 5; a long-running server would pile them up."""
    tts = tts_for(fake)
    for _ in range(8):
        await tts.synthesize("Hello there.")
    fake.tts = TtsScript(chunk_delay_s=0.02)
    for _ in range(4):
        async with aclosing(tts.stream("A reply interrupted at once.")) as stream:
            async for _ in stream:
                break

    def tts_threads() -> list[str]:  # (a worker whose handshake was refused polls 5 s in the SDK, then ends)
        return [t.name for t in threading.enumerate() if "run_forever" in t.name or t.name == "dashscope-tts-cancel"]

    assert await fake.until(lambda: not tts_threads(), 3), tts_threads()


async def test_tts_empty_text_makes_no_request(fake: FakeDashScope) -> None:
    segment = await tts_for(fake).synthesize("  ")
    assert segment.pcm16 == b"" and segment.sample_rate == 22050
    assert fake.connections == []


def test_tts_config_from_app_config() -> None:
    assert DashScopeTTS.from_app_config(SimpleNamespace()).config == DashScopeTTSConfig()
    app = SimpleNamespace(tts=SimpleNamespace(dashscope=DashScopeTTSConfig(sample_rate=24000)))
    assert DashScopeTTS(app).sample_rate == 24000
