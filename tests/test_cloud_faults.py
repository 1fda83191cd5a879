"""The cloud path through real session actors (issue 9): the official
dashscope and openai SDKs against their loopback fakes. Faults, each leaving
the session usable; failover chains falling back to the embedded models; the
breaker opening and closing; barge-in cancelling the cloud synthesis; and the
reply started at a pause in speech (preemptive generation)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import pytest
import ray

from actors.audio import silence
from actors.sessions import new_session_id
from actors.sessions import open_session as open_session_actor
from tests.conftest import frames_of, send_frames
from tests.fakes.dashscope_server import AsrScript, FakeDashScope, Fault, TtsScript
from tests.fakes.openai_server import FakeOpenAIServer, Script

KEY = "sk-test-faults-0123456789"
QUESTION = "What is twelve times seven?"


@pytest.fixture(scope="module")
def fakes():
    with FakeDashScope(api_key=KEY) as dashscope, FakeOpenAIServer(api_key=KEY) as llm:
        yield dashscope, llm


@pytest.fixture
def clean(fakes):
    dashscope, llm = fakes
    dashscope.reset()
    llm.requests.clear()
    llm.default = Script.text("Hello from the cloud.")
    yield dashscope, llm


def cloud(config: Any, fakes: Any, *, stt_fallback: list[str] = (), llm_fallback: list[str] = (),
          tts_fallback: list[str] = (), llm_key: str = KEY, llm_retries: int = 0, **resilience: Any) -> Any:
    """The test config with all three stages on the cloud fakes and the given chains."""
    from actors.config import LLMConfig, ResilienceConfig, STTConfig, TTSConfig

    dashscope, llm = fakes
    stt = STTConfig.model_validate({**config.stt.model_dump(), "provider": "dashscope", "fallback": list(stt_fallback),
                                    "dashscope": {"websocket_url": dashscope.url, "api_key": KEY, "timeout_s": 3}})
    tts = TTSConfig.model_validate({**config.tts.model_dump(), "provider": "dashscope", "fallback": list(tts_fallback),
                                    "dashscope": {"websocket_url": dashscope.url, "api_key": KEY,
                                                  "sample_rate": 16000, "first_audio_timeout_s": 1.0}})
    llm_cfg = LLMConfig.model_validate({**config.llm.model_dump(), "provider": "openai-compatible",
                                        "fallback": list(llm_fallback),
                                        "openai_compat": {"base_url": llm.base_url, "api_key": llm_key,
                                                          "model": "qwen-plus", "retries": llm_retries,
                                                          "retry_backoff_s": 0.05}})
    return config.model_copy(update={"stt": stt, "tts": tts, "llm": llm_cfg,
                                     "resilience": ResilienceConfig(**resilience)})


async def open_session(config: Any) -> Any:
    return await open_session_actor(config, new_session_id())


async def end(actor: Any) -> None:
    """Close the session; the actor exits as it answers."""
    with contextlib.suppress(ray.exceptions.RayActorError):
        await actor.close.remote()


async def text_turn(actor: Any, t: Any, text: str) -> tuple[int, Any]:
    turn = await actor.send_text.remote(text)
    metrics = await t.wait_for(lambda e: e.type == "metrics" and e.turn_id == turn, 60)
    return turn, metrics


def reply_of(t: Any, turn: int) -> str:
    return "".join(e.text for e in t.of("llm.delta", turn))


def codes(t: Any, turn: int) -> list[str]:
    return [str(e.code) for e in t.of("error", turn)]


# ------------------------------------------------------------------ STT
@pytest.mark.parametrize("fault", [Fault("drop", after=2), Fault("fail", after=2, code="InternalError")],
                         ids=["connection-dropped", "task-failed"])
async def test_stt_fault_mid_utterance_falls_back_to_whisper_on_the_same_audio(
        ray_cluster, config, clean, speech, tap, fault):
    dashscope, llm = clean
    dashscope.asr = AsrScript(sentences=["never finished"], fault=fault)
    actor = await open_session(cloud(config, clean, stt_fallback=["local-whisper"]))
    async with tap(actor) as t:
        await send_frames(actor, frames_of(silence(300) + speech(QUESTION) + silence(1000)), realtime=True)
        final = await t.wait_for(lambda e: e.type == "stt.final", 60)
        await t.wait_for(lambda e: e.type == "metrics" and e.turn_id == final.turn_id, 60)
        words = final.text.lower()
        tasks = [(t.kind, len(t.audio_frames), t.dropped, t.failed) for t in dashscope.tasks[-3:]]
        assert ("twelve" in words or "12" in words) and ("seven" in words or "7" in words), (final.text, tasks)
        failover = [e.message for e in t.of("error", final.turn_id) if e.code == "provider.failover"]
        assert len(failover) == 1 and "dashscope failed (stt." in failover[0] and "local-whisper" in failover[0]
        assert reply_of(t, final.turn_id) == "Hello from the cloud."
        # the session goes on, and the recogniser is asked again on the next utterance
        dashscope.asr = AsrScript(sentences=["and now it works"])
        tasks = len(dashscope.tasks)
        await send_frames(actor, frames_of(speech("Thank you.") + silence(1000), start_seq=10_000), realtime=True)
        second = await t.wait_for(lambda e: e.type == "stt.final" and e.turn_id > final.turn_id, 60)
        assert second.text == "and now it works" and len(dashscope.tasks) > tasks
    await end(actor)


async def test_stt_task_failed_without_a_fallback_is_an_error_and_the_session_goes_on(
        ray_cluster, config, clean, speech, tap):
    dashscope, _ = clean
    dashscope.asr = AsrScript(fault=Fault("fail", after=2, code="ClientError", message="bad audio"))
    actor = await open_session(cloud(config, clean))
    async with tap(actor) as t:
        await send_frames(actor, frames_of(silence(300) + speech(QUESTION) + silence(1000)), realtime=True)
        err = await t.wait_for(lambda e: e.type == "error" and e.code == "stt.failed", 60)
        assert "bad audio" in err.message or "ClientError" in err.message
        dashscope.asr = AsrScript(sentences=["twelve times seven"], interims_per_sentence=2)
        await send_frames(actor, frames_of(speech(QUESTION) + silence(1000), start_seq=10_000), realtime=True)
        final = await t.wait_for(lambda e: e.type == "stt.final" and e.text, 60)
        assert final.text == "twelve times seven"
        partials = [e.text for e in t.of("stt.partial", final.turn_id)]
        assert partials and all("twelve times seven".startswith(p) for p in partials), partials
    await end(actor)


# ------------------------------------------------------------------ TTS
async def test_tts_stalling_past_its_timeout_falls_back_to_the_local_voice(ray_cluster, config, clean, tap):
    dashscope, llm = clean
    dashscope.tts = TtsScript(fault=Fault("stall"))
    actor = await open_session(cloud(config, clean, tts_fallback=["local-espeak"]))
    async with tap(actor) as t:
        turn, metrics = await text_turn(actor, t, "Say hello.")
        failover = [e.message for e in t.of("error", turn) if e.code == "provider.failover"]
        assert failover and "tts.timeout" in failover[0] and "local-espeak" in failover[0], failover
        audio = b"".join(c.pcm16 for c in t.of("tts.audio", turn))
        assert len(audio) > 16000, "the sentence was spoken by the fallback voice"
        assert metrics.served_by == {"llm": "openai-compatible", "tts": "local-espeak"}, "no speech, no STT"
        dashscope.tts = TtsScript()
        turn, metrics = await text_turn(actor, t, "Again.")
        assert codes(t, turn) == [] and metrics.served_by["tts"] == "dashscope"
    await end(actor)


async def test_barge_in_during_cloud_speech_stops_within_a_chunk_and_cancels_the_task(
        ray_cluster, config, clean, tap):
    dashscope, llm = clean
    # 47 chunks 0.25 s apart: ~12 s of synthesis, so a slow CI run still interrupts it mid-way (at
    # 0.1 s apart it once finished before the barge-in); one sentence under 100 characters, one task
    dashscope.tts = TtsScript(chunk_delay_s=0.25, ms_per_char=60)
    llm.default = Script.text("This is a long answer that the visitor will certainly interrupt before it ends.")
    actor = await open_session(cloud(config, clean))
    async with tap(actor) as t:
        turn = await actor.send_text.remote("Tell me everything.")
        await t.wait_for(lambda e: e.type == "tts.audio" and e.turn_id == turn and e.seq >= 1, 30)
        task = next(x for x in reversed(dashscope.tasks) if x.kind == "tts")
        assert not task.finished, "audio arrived while CosyVoice was still synthesising"
        await actor.interrupt.remote()
        interrupted = time.monotonic()
        stop = await t.wait_for(lambda e: e.type == "tts.stop" and e.turn_id == turn, 10)
        assert stop.reason == "interrupted"
        assert await dashscope.until(lambda: task.cancelled or task.client_closed_early, 2)
        assert task.chunks_sent_after(interrupted) <= 1, "the service stopped within one chunk"
        assert not task.finished and task.chunks_sent < 20
        await asyncio.sleep(0.3)
        after_stop = [e for e in t.events[t.events.index(stop):] if e.type == "tts.audio" and e.turn_id == turn]
        assert after_stop == []
    await end(actor)


# ------------------------------------------------------------------ LLM
async def test_llm_500_then_success_is_retried_without_the_user_noticing(ray_cluster, config, clean, tap):
    _, llm = clean
    llm.enqueue(Script.error(500), Script.text("Eighty-four."))
    actor = await open_session(cloud(config, clean, llm_retries=2))
    async with tap(actor) as t:
        turn, metrics = await text_turn(actor, t, QUESTION)
        assert reply_of(t, turn) == "Eighty-four." and codes(t, turn) == []
        assert len(llm.requests) == 2 and metrics.llm_usage
    await end(actor)


async def test_a_429_storm_opens_the_breaker_falls_back_and_the_breaker_closes_later(
        ray_cluster, config, clean, tap):
    _, llm = clean
    llm.default = Script.error(429, "Too many requests")
    storm = cloud(config, clean, llm_fallback=["local-dialogue"], breaker_failures=2, breaker_reset_s=6.0)
    # replies sent at once, not paced: four turns well inside the breaker's 6 s
    actor = await open_session(storm.model_copy(update={"tts": storm.tts.model_copy(update={"pace": False})}))
    async with tap(actor) as t:
        for _ in range(4):
            turn, metrics = await text_turn(actor, t, QUESTION)
            assert "84" in reply_of(t, turn), "the local dialogue engine answered"
            assert metrics.served_by["llm"] == "local-dialogue"
        assert len(llm.requests) == 2, "after two failures the breaker keeps turns away from the cloud"
        said = [e.message for e in t.of("error") if e.code == "provider.failover"]
        assert sum("llm.rate_limited" in m for m in said) == 2 and sum("circuit open" in m for m in said) == 1
        llm.default = Script.text("The cloud is back.")
        await asyncio.sleep(6.2)
        turn, metrics = await text_turn(actor, t, QUESTION)
        assert reply_of(t, turn) == "The cloud is back." and metrics.served_by["llm"] == "openai-compatible"
        assert codes(t, turn) == [] and len(llm.requests) == 3
    await end(actor)


async def test_a_wrong_key_is_a_clear_error_and_the_session_stays_usable(ray_cluster, config, clean, tap):
    _, llm = clean
    actor = await open_session(cloud(config, clean, llm_key="sk-wrong-key-000000000000"))
    async with tap(actor) as t:
        turn, _ = await text_turn(actor, t, QUESTION)
        errors = t.of("error", turn)
        assert [e.code for e in errors] == ["llm.auth"]
        assert "sk-wrong" not in errors[0].message and "key" in errors[0].message.lower()
        turn2 = await actor.send_text.remote("Hello?")
        assert turn2 == turn + 1
        await t.wait_for(lambda e: e.type == "metrics" and e.turn_id == turn2, 30)
    await end(actor)


# ------------------------------------------------------------------ preemptive generation
async def test_the_reply_starts_at_a_pause_and_is_kept_when_the_final_transcript_agrees(
        ray_cluster, config, clean, speech, tap):
    dashscope, llm = clean
    dashscope.asr = AsrScript(sentences=["What is twelve times seven?"], interims_reach_end=True, final_delay_s=0.2)
    llm.default = Script.text("Twelve times seven is 84.", first_token_s=0.3)
    actor = await open_session(cloud(config, clean))
    async with tap(actor) as t:
        await send_frames(actor, frames_of(silence(300) + speech(QUESTION) + silence(1000)), realtime=True)
        final = await t.wait_for(lambda e: e.type == "stt.final", 60)
        metrics = await t.wait_for(lambda e: e.type == "metrics" and e.turn_id == final.turn_id, 60)
    asr = next(x for x in reversed(dashscope.tasks) if x.kind == "asr")
    assert len(llm.requests) == 1, "one LLM request: the preemptive one was kept"
    request = llm.requests[0]
    assert request.received_at < asr.finish_requested_at, "the LLM was asked before the utterance ended"
    assert request.messages[-1]["content"] == "What is twelve times seven"
    assert final.text == "What is twelve times seven?" and metrics.llm_preemptive
    assert reply_of(t, final.turn_id) == "Twelve times seven is 84."
    deltas = t.of("llm.delta", final.turn_id)
    assert deltas and all(d.ts >= final.ts for d in deltas), "nothing of the reply shows before the transcript"
    stats = await actor.stats.remote()
    assert stats["preemptive_replies"] == {"started": 1, "used": 1, "discarded": 0}
    await end(actor)


async def test_a_preemptive_reply_on_other_words_is_discarded_and_the_turn_answers_the_final_words(
        ray_cluster, config, clean, speech, tap):
    dashscope, llm = clean
    dashscope.asr = AsrScript(sentences=["What is twelve times seven?"], interims_per_sentence=3)  # interims lag
    llm.default = Script.text("An answer.", first_token_s=0.2)
    actor = await open_session(cloud(config, clean))
    async with tap(actor) as t:
        await send_frames(actor, frames_of(silence(300) + speech(QUESTION) + silence(1000)), realtime=True)
        final = await t.wait_for(lambda e: e.type == "stt.final", 60)
        metrics = await t.wait_for(lambda e: e.type == "metrics" and e.turn_id == final.turn_id, 60)
    assert [r.messages[-1]["content"] for r in llm.requests][-1] == "What is twelve times seven?"
    assert len(llm.requests) == 2 and llm.requests[0].messages[-1]["content"] != final.text
    assert await dashscope.until(lambda: llm.requests[0].disconnected or llm.requests[0].completed, 2)
    assert not metrics.llm_preemptive and reply_of(t, final.turn_id) == "An answer."
    stats = await actor.stats.remote()
    assert stats["preemptive_replies"] == {"started": 1, "used": 0, "discarded": 1}
    history = await actor.history.remote()
    assert [m["content"] for m in history if m["role"] == "user"] == ["What is twelve times seven?"]
    await end(actor)


# ------------------------------------------------------------------ per-key limits
async def test_a_keys_concurrency_limit_is_cluster_wide_and_its_refusal_fails_over(ray_cluster, config, clean):
    """Two calls with one key whose limit is one: the second waits, then fails over to the
    local engine as llm.rate_limited; the lease comes back when the first ends."""
    from actors.config import KeyLimit
    from actors.providers.adapters.fallback import FallbackLLM, build_chain
    from actors.providers.adapters.key_limits import limited
    from actors.providers.base import ChatMessage
    from actors.providers.local.factories import dialogue_engine
    from actors.providers.openai_compat.llm import OpenAICompatConfig, OpenAICompatLLM

    _, llm = clean
    llm.default = Script.text("From the cloud.", first_token_s=1.0)
    limit = {"FAULTS_TEST_KEY": KeyLimit(max_concurrency=1, max_wait_s=0.2)}
    cloud_llm = OpenAICompatLLM(OpenAICompatConfig(base_url=llm.base_url, api_key=KEY, model="qwen-plus"))
    made = {"openai-compatible": limited("llm", cloud_llm, "FAULTS_TEST_KEY", limit, config.server.namespace),
            "local-dialogue": dialogue_engine(config)}
    told: list[str] = []
    chain = build_chain("llm", ["openai-compatible", "local-dialogue"], made.__getitem__, config.resilience)
    chain.notify = told.append
    question = [ChatMessage(role="user", content="Hello!")]

    async def ask() -> str:
        return "".join([c.text async for c in FallbackLLM(chain).stream(question, [])])

    first = asyncio.create_task(ask())
    assert await llm.wait_until(lambda: len(llm.requests) == 1, 30), "the first call holds the key's one lease"
    second = await ask()
    assert "Ava" in second and told and "llm.rate_limited" in told[0] and "FAULTS_TEST_KEY" in told[0]
    assert await first == "From the cloud."
    third = await ask()  # the lease was given back
    assert third == "From the cloud." and len(llm.requests) == 2


# ------------------------------------------------------------------ issue 12, item 6: slow first byte, drops
def _first_token_timeout(config: Any, seconds: float) -> Any:
    from actors.config import LLMConfig

    dumped = config.llm.model_dump()
    dumped["openai_compat"] = {**dumped["openai_compat"], "first_token_timeout_s": seconds}
    return config.model_copy(update={"llm": LLMConfig.model_validate(dumped)})


@pytest.mark.parametrize("first_token_s, served_by", [(0.5, "openai-compatible"), (3.0, "local-dialogue")],
                         ids=["below-timeout", "above-timeout"])
async def test_a_slow_first_byte_is_waited_for_below_the_timeout_and_failed_over_above_it(
        ray_cluster, config, clean, tap, first_token_s, served_by):
    _, llm = clean
    llm.default = Script.text("Eighty-four.", first_token_s=first_token_s)
    actor = await open_session(_first_token_timeout(cloud(config, clean, llm_fallback=["local-dialogue"]), 1.5))
    async with tap(actor) as t:
        started = time.time()
        turn, metrics = await text_turn(actor, t, QUESTION)
        answered_after = t.of("llm.delta", turn)[0].ts - started  # first words, not the end of the speech
        assert metrics.served_by["llm"] == served_by
        if served_by == "openai-compatible":
            assert reply_of(t, turn) == "Eighty-four." and codes(t, turn) == []
            assert answered_after >= first_token_s
        else:
            said = [e.message for e in t.of("error", turn) if e.code == "provider.failover"]
            # the local engine answers with a tool round: that round stays with it, the cloud is not
            # waited for a second time in the same turn
            assert len(said) == 1 and "llm.timeout" in said[0] and "local-dialogue" in said[0], said
            assert "84" in reply_of(t, turn) and 1.5 <= answered_after < 1.5 + 1.5, answered_after
            assert len(llm.requests) == 1
        llm.default = Script.text("Back again.")
        turn, metrics = await text_turn(actor, t, "Again?")
        assert reply_of(t, turn) == "Back again." and codes(t, turn) == []
    await end(actor)


async def test_an_llm_connection_dropped_mid_reply_is_an_error_and_the_next_turn_uses_the_cloud(
        ray_cluster, config, clean, tap):
    from tests.fakes.openai_server import Chunk

    _, llm = clean
    llm.enqueue(Script(chunks=[Chunk(delta={"role": "assistant", "content": ""}), Chunk(delta={"content": "Twelve "})],
                       end="abort"))
    actor = await open_session(cloud(config, clean, llm_fallback=["local-dialogue"]))
    async with tap(actor) as t:
        turn, metrics = await text_turn(actor, t, QUESTION)
        # words were already out: no failover (the fallback would start the answer again), a clear error
        assert codes(t, turn) == ["llm.unreachable"] and reply_of(t, turn).startswith("Twelve"), codes(t, turn)
        turn, metrics = await text_turn(actor, t, "Again?")
        assert reply_of(t, turn) == "Hello from the cloud." and metrics.served_by["llm"] == "openai-compatible"
    await end(actor)
