"""Output belongs to each subscriber, and noise does not cut a reply.

- Speech, its rate and its pacing are chosen per `events()` stream: a text
  client (HTTP, text socket, a text-only subscriber) never mutes a device
  listening to the same session, and a session nobody listens to speaks to
  no one (no TTS time spent).
- While a reply is in flight, speech must last `vad.min_interruption_ms`
  before it cuts the reply; shorter bursts are ignored.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
import ray
from pydantic import SecretStr

from actors.audio import rms_dbfs, silence
from actors.client import NativeClient
from actors.ingress.auth import Authenticator
from actors.pools import get_pool
from actors.session import EventStream
from actors.sessions import find_session, new_session_id, open_session
from tests.conftest import INGRESS_PORT, EventTap, frames_of, run_ingress, send_frames

LONG_REPLY = "Tell me about the Rosetta Stone."
"""~85 words of reply, ~30 s spoken."""
SHORT_REPLY = "Hello!"
"""~13 words, ~4 s spoken: long enough to talk over, short enough to wait for."""
QUESTION = "What time is it?"


class OutputTap(EventTap):
    """An EventTap that subscribes with its own output settings (EventTap's
    own __init__ would open a default, speaking subscription first)."""

    def __init__(self, actor: Any, **output: Any) -> None:
        self.actor = actor
        self.events: list[Any] = []
        self._stream = EventStream(actor, **output)
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()


async def open_actor(config: Any) -> Any:
    actor = await open_session(config, new_session_id())
    await actor.ready.remote()
    return actor


def turn_done(turn: int):
    return lambda e: e.type == "metrics" and e.turn_id == turn


def audio_of(tap: EventTap, turn: int) -> bytes:
    return b"".join(e.pcm16 for e in tap.of("tts.audio", turn))


async def tts_pool_calls(config: Any) -> int:
    return (await get_pool("tts", config.tts.provider, config).stats.remote())["calls"]


# ------------------------------------------------------------------ item 9: output per subscriber
async def test_text_only_subscriber_does_not_mute_listeners_at_their_own_rates(ray_cluster, config, tap):
    actor = await open_actor(config)
    async with OutputTap(actor, speak=False) as text, tap(actor) as voice, \
            OutputTap(actor, sample_rate=24000) as voice24:
        assert text.events[0].output_sample_rate == 16000 and voice24.events[0].output_sample_rate == 24000
        turn = await actor.send_text.remote("What is twelve times seven?")  # sent on the text client's behalf
        for t in (text, voice, voice24):
            await t.wait_for(turn_done(turn))
    assert "84" in "".join(e.text for e in text.of("llm.delta", turn))
    assert text.of("tts.audio") == []  # a text client gets the words, never the audio
    assert [e.reason for e in voice.of("tts.stop", turn)] == ["done"]
    chunks16, chunks24 = voice.of("tts.audio", turn), voice24.of("tts.audio", turn)
    assert chunks16 and {c.sample_rate for c in chunks16} == {16000} and {c.sample_rate for c in chunks24} == {24000}
    assert [c.seq for c in chunks16] == [c.seq for c in chunks24] == list(range(len(chunks16)))
    assert voice.of("tts.start", turn)[0].sample_rate == 16000 and voice24.of("tts.start", turn)[0].sample_rate == 24000
    seconds16, seconds24 = len(audio_of(voice, turn)) / 32000, len(audio_of(voice24, turn)) / 48000
    assert seconds16 > 0.8 and abs(seconds16 - seconds24) < 0.01, (seconds16, seconds24)
    assert rms_dbfs(audio_of(voice24, turn)) > -35
    # the same sentence at either rate: the STT hears the answer in the 16 kHz copy
    heard = await get_pool("stt", "local-whisper", config).transcribe.remote(audio_of(voice, turn))
    assert "84" in heard or "eighty" in heard.lower(), heard
    ray.kill(actor.actor)


async def test_session_with_only_text_subscribers_synthesises_nothing(ray_cluster, config, speech):
    speech(QUESTION)  # warm the fixture's cache now: its synthesis must not count below
    actor = await open_actor(config)
    async with OutputTap(actor, speak=False) as text:
        calls_before = await tts_pool_calls(config)
        turn = await actor.send_text.remote(LONG_REPLY)
        await text.wait_for(turn_done(turn))
        quiet = (await actor.stats.remote())["sentences_synthesized"], await tts_pool_calls(config) - calls_before
        async with OutputTap(actor, sample_rate=16000) as voice:  # now someone listens: the counters move
            turn2 = await actor.send_text.remote("What is two plus two?")
            await voice.wait_for(turn_done(turn2))
        spoken = (await actor.stats.remote())["sentences_synthesized"], await tts_pool_calls(config) - calls_before
    assert [e.type for e in text.events if e.turn_id == turn and e.type.startswith("tts.")] == []
    assert len("".join(e.text for e in text.of("llm.delta", turn))) > 100  # a long reply, all of it text
    assert quiet == (0, 0)
    assert spoken[0] >= 1 and spoken[1] >= spoken[0] and voice.of("tts.audio", turn2)
    ray.kill(actor.actor)


async def test_unpaced_subscriber_gets_the_reply_at_once_only_when_alone(ray_cluster, config, tap):
    actor = await open_actor(config)

    async def reply_timing(*taps: EventTap) -> tuple[float, float]:
        """→ (seconds of audio, seconds from its first chunk to tts.stop) for taps[0]."""
        turn = await actor.send_text.remote(SHORT_REPLY)
        for t in taps:
            await t.wait_for(turn_done(turn))
        chunks, stop = taps[0].of("tts.audio", turn), taps[0].of("tts.stop", turn)[0]
        return len(audio_of(taps[0], turn)) / 32000, stop.ts - chunks[0].ts

    async with OutputTap(actor, pace=False) as http:
        alone = await reply_timing(http)
        async with tap(actor) as device:  # a device listening in real time paces the session for everyone
            shared = await reply_timing(http, device)
    assert alone[0] > 3.0 and shared[0] > 3.0, (alone, shared)
    assert alone[1] < alone[0] / 3, alone  # much faster than real time
    prebuffer_s = config.tts.prebuffer_ms / 1000
    assert shared[1] > shared[0] - prebuffer_s - 0.3, shared  # real time: what the device hears
    ray.kill(actor.actor)


# ------------------------------------------------------------------ item 9 over the ingress
@pytest.fixture(scope="module")
def server_config(config: Any) -> Any:
    auth = config.auth.model_copy(update={"jwt_secret": SecretStr("output-test-jwt-secret-0123456789abcdef"),
                                          "device_secret": SecretStr("output-test-device-secret-0123456789")})
    limits = config.limits.model_copy(update={"requests_per_minute": 600, "burst": 40})
    # no warm sessions: a socket's session starts on a new actor after its hello (StartingSession),
    # and what the client does with its id meanwhile must still reach it
    server = config.server.model_copy(update={"warm_sessions": 0})
    return config.model_copy(update={"auth": auth, "limits": limits, "server": server})


@pytest.fixture(scope="module")
def server(ray_cluster: Any, server_config: Any) -> Any:
    yield from run_ingress(server_config, "voice-actors-output-test")


async def test_http_text_turn_is_heard_by_the_voice_socket_on_the_same_session(server, server_config):
    token = Authenticator(server_config.auth).issue_token("listener")
    headers = {"Authorization": f"Bearer {token}"}
    async with await NativeClient.connect(f"ws://127.0.0.1:{INGRESS_PORT}/ws/voice", token) as device, \
            httpx.AsyncClient(timeout=60) as http:
        heard = asyncio.create_task(device.receive_turn(timeout_s=60))
        r = await http.post(f"{server}/api/text/process", headers=headers,
                            json={"text": "What is twelve times seven?", "session_id": device.session_id})
        turn = await heard
        assert r.status_code == 200 and "84" in r.json()["reply"], r.text
        # before, the text route muted the session for good: the next turn too must still be heard
        again = asyncio.create_task(device.receive_turn(timeout_s=60))
        r2 = await http.post(f"{server}/api/text/batch", headers=headers,
                             json={"texts": ["What is two plus two?"], "session_id": device.session_id})
        turn2 = await again
    assert [m["turn_id"] for m in turn.messages if m["type"] == "metrics"] == [r.json()["turn_id"]]
    assert turn.sample_rate == 16000 and len(turn.audio) / 32000 > 0.8 and rms_dbfs(turn.audio) > -35
    assert not turn.interrupted and "84" in turn.reply
    assert r2.status_code == 200 and "4" in turn2.reply and len(turn2.audio) / 32000 > 0.5


async def test_http_text_turn_alone_synthesises_nothing(server, server_config):
    token = Authenticator(server_config.auth).issue_token("reader")
    async with httpx.AsyncClient(timeout=60) as http:
        r = await http.post(f"{server}/api/text/process", headers={"Authorization": f"Bearer {token}"},
                            json={"text": LONG_REPLY})
    assert r.status_code == 200 and len(r.json()["reply"]) > 100, r.text
    actor = await find_session(server_config, r.json()["session_id"])
    assert (await actor.stats.remote())["sentences_synthesized"] == 0


# ------------------------------------------------------------------ item 10: min interruption duration
def burst(speech_pcm: bytes, ms: int) -> bytes:
    """`ms` of speech cut from the middle of an utterance: enough for the VAD
    to confirm speech (start_ms), too short to be a question."""
    start = len(speech_pcm) // 4 // 2 * 2
    return speech_pcm[start:start + 32 * ms]


async def test_short_burst_during_a_reply_does_not_cut_it(ray_cluster, config, speech, tap):
    actor = await open_actor(config)
    async with tap(actor) as t:
        turn = await actor.send_text.remote(SHORT_REPLY)
        await t.wait_for(lambda e: e.type == "tts.audio" and e.turn_id == turn and e.seq >= 3)
        await send_frames(actor, frames_of(burst(speech(QUESTION), 200) + silence(900)), stream="noise")
        assert await actor.utterances.remote(settle=True) == 0
        playing_when_heard = not t.of("tts.stop", turn)
        stop = await t.wait_for(lambda e: e.type == "tts.stop" and e.turn_id == turn)
        await t.wait_for(turn_done(turn))
    assert playing_when_heard  # the burst reached the VAD while the reply was playing
    stats = await actor.stats.remote()
    assert stats["short_speech_ignored"] == 1  # the VAD did hear speech: it was held back, then dropped
    assert stop.reason == "done" and not t.of("metrics", turn)[0].interrupted
    assert t.of("vad.speech_start") == [] and stats["turn_id"] == turn  # no turn for the noise
    ray.kill(actor.actor)


async def test_question_during_a_reply_cuts_it_once_long_enough_and_is_answered(ray_cluster, config, speech, tap):
    lead_ms = 300
    question = silence(lead_ms) + speech(QUESTION) + silence(1200)
    idle, busy = await open_actor(config), await open_actor(config)
    async with tap(idle) as t:  # not replying: the utterance opens after start_ms, as before
        await send_frames(idle, frames_of(question), stream="q")
        idle_start = await t.wait_for(lambda e: e.type == "vad.speech_start")
    async with tap(busy) as t:
        turn = await busy.send_text.remote(LONG_REPLY)
        await t.wait_for(lambda e: e.type == "tts.audio" and e.turn_id == turn and e.seq >= 3)
        await send_frames(busy, frames_of(question), stream="q")
        start = await t.wait_for(lambda e: e.type == "vad.speech_start")
        stop = await t.wait_for(lambda e: e.type == "tts.stop" and e.turn_id == turn)
        await t.wait_for(turn_done(start.turn_id))
    min_ms = config.vad.min_interruption_ms
    # no added latency when idle: the utterance opens exactly where the VAD alone confirms start_ms of
    # speech (the embedded voice varies from run to run, so the onset is measured, not assumed)
    assert abs(idle_start.stream_ms - _vad_onset_ms(config, question)) <= 60, idle_start.stream_ms
    # during the reply the decision waits for min_interruption_ms of speech after its onset
    assert start.stream_ms >= idle_start.stream_ms - config.vad.start_ms + min_ms - 30, (start, idle_start)
    assert stop.reason == "interrupted" and stop.stream_ms == start.stream_ms
    assert t.of("metrics", turn)[0].interrupted
    assert "It is" in "".join(e.text for e in t.of("llm.delta", start.turn_id))
    assert (await busy.stats.remote())["short_speech_ignored"] == 0
    for actor in (idle, busy):
        ray.kill(actor.actor)


def _vad_onset_ms(config, pcm: bytes) -> int:
    """Where a fresh VAD first sees start_ms of consecutive speech in `pcm`, as the session counts it."""
    from actors.audio import split_frames
    from actors.providers import build_vad

    vad = build_vad(config)
    needed, run = max(1, config.vad.start_ms // vad.frame_ms), 0
    for i, frame in enumerate(split_frames(pcm, vad.frame_ms)):
        run = run + 1 if len(frame) == vad.frame_ms * 32 and vad.is_speech(frame) else 0
        if run >= needed:
            return (i + 1) * vad.frame_ms
    raise AssertionError("the VAD found no speech")


# ------------------------------------------------------------------ a client that leaves mid-utterance
async def test_words_of_a_client_that_left_mid_utterance_end_it_after_a_grace(ray_cluster, config, speech):
    """Its STT stream used to stay open (a call in flight) until new speech or
    the orphan timeout, two minutes: a cloud stream and a key's lease held for
    nobody. Within the grace a returning client speaks on in the same utterance."""
    from actors.providers.adapters.usage import provider_report
    from actors.session import build_core

    def stt_in_flight() -> int:
        return sum(p["in_flight"] for key, p in provider_report().items() if key.startswith("stt:"))

    core = build_core(new_session_id(), config)
    core.CLIENT_GONE_GRACE_S = 0.5
    core.start()
    words = speech("What is twelve times seven?")
    half = len(words) // 2 // 2 * 2
    try:
        q = core.subscribe()
        for seq, frame in frames_of(silence(300) + words[:half]):
            core.send_audio([(seq, frame)])
        for _ in range(100):
            if core.audio.in_speech:
                break
            await asyncio.sleep(0.05)
        assert core.audio.in_speech and stt_in_flight() == 1
        core.unsubscribe(q)  # the device's link blinks: back within the grace, the utterance goes on
        await asyncio.sleep(0.1)
        q = core.subscribe()
        await asyncio.sleep(0.8)
        assert core.audio.in_speech and core.audio.utterances == 1
        core.unsubscribe(q)  # gone for good
        for _ in range(200):
            if not core.audio.in_speech and stt_in_flight() == 0:
                break
            await asyncio.sleep(0.05)
        assert not core.audio.in_speech and core.audio.utterances == 1
        assert stt_in_flight() == 0  # its STT stream ended
    finally:
        await core.close()
