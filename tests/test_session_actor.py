"""A session actor end to end on real Ray and the real embedded models."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import ray

from actors.audio import rms_dbfs, silence
from actors.ingress.limits import LimitError
from actors.node_cpu import NodeCpu
from actors.pools import get_pool
from actors.session_manager import SessionManager
from actors.session_ref import SessionMoved
from actors.sessions import SessionHandle, find_session, new_session_id, open_session
from tests.conftest import TEST_NAMESPACE, frames_of, send_frames

QUESTION = "What is twelve times seven?"


async def open_actor(config):
    return await open_session(config, new_session_id())


async def test_spoken_question_gets_transcript_reply_and_real_speech(ray_cluster, config, speech, tap):
    actor = await open_actor(config)
    stt_pool = get_pool("stt", "local-whisper", config)
    window_decodes = (await stt_pool.stats.remote())["decodes"]
    audio = silence(400) + speech(QUESTION) + silence(1200)
    async with tap(actor) as t:
        await send_frames(actor, frames_of(audio), batch=1, realtime=True)  # as a device streams it
        final = await t.wait_for(lambda e: e.type == "stt.final")
        metrics = await t.wait_for(lambda e: e.type == "metrics" and e.turn_id == final.turn_id)
    turn = final.turn_id
    words = final.text.lower()
    assert ("12" in words or "twelve" in words) and ("7" in words or "seven" in words), final.text
    reply = "".join(e.text for e in t.of("llm.delta", turn))
    assert "84" in reply, reply

    chunks = t.of("tts.audio", turn)
    assert chunks and all(c.sample_rate == config.session.output_sample_rate for c in chunks)
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    pcm = b"".join(c.pcm16 for c in chunks)
    seconds = len(pcm) / 2 / config.session.output_sample_rate
    assert 0.8 < seconds < 6.0, seconds
    assert rms_dbfs(pcm) > -35.0
    # the reply audio is real speech: the embedded STT hears the answer in it
    heard = await stt_pool.transcribe.remote(pcm)
    assert "84" in heard or "eighty" in heard.lower(), heard
    # both decodes ran in the short encoder window (stt.encoder_window_s); the 30 s one only redoes a loop
    after = (await stt_pool.stats.remote())["decodes"]
    assert after["short_window"] - window_decodes["short_window"] == 2, (window_decodes, after)
    assert after["full_window"] - window_decodes["full_window"] == after["loop_redone"] - window_decodes["loop_redone"]

    order = [e.type for e in t.events if e.turn_id == turn]
    for earlier, later in [("vad.speech_start", "vad.speech_end"), ("vad.speech_end", "stt.final"),
                           ("stt.final", "llm.delta"), ("tool.call", "tool.result"), ("llm.delta", "tts.start"),
                           ("tts.start", "tts.sentence"), ("tts.sentence", "tts.audio"), ("tts.audio", "tts.stop"),
                           ("tts.stop", "metrics")]:
        assert order.index(earlier) < order.index(later), (earlier, later, order)
    assert t.of("tool.call", turn)[0].name == "calculate"
    assert metrics.stt_final_ms > 0 and metrics.llm_first_token_ms >= 0
    assert metrics.tts_first_audio_ms > 0 and metrics.first_audio_ms > metrics.stt_final_ms
    assert not metrics.interrupted
    # Whisper decoded once, at the pause after the question, and that decode was the transcript
    # (it ran during the end-silence wait): no second decode after the end of speech
    stats = await actor.stats.remote()
    assert stats["stt_decodes"].get("at_pause_used") == 1 and not stats["stt_decodes"].get("final"), stats
    # that decode ended a sentence ("…times seven?"), so the utterance closed before end_silence_ms
    # (vad.sentence_end_ms): the speech ends where the silence after it begins
    speech_over_ms = (len(audio) - len(silence(1200))) / 32
    vad_end = t.of("vad.speech_end", turn)[0]
    assert stats["ended_on_sentence"] == 1, stats
    assert vad_end.stream_ms - speech_over_ms < config.vad.end_silence_ms, (vad_end.stream_ms, speech_over_ms)
    assert stats["mailbox_backlog"] == {"audio_buffer": 0, "stt_stream": 0, "dialogue": 0, "tts": 0}, stats
    ray.kill(actor.actor)


async def test_barge_in_stops_reply_at_once_and_keeps_only_what_was_heard(ray_cluster, config, speech, tap):
    actor = await open_actor(config)
    async with tap(actor) as t:
        first_turn = await actor.send_text.remote("Tell me about the Rosetta Stone.")
        await t.wait_for(lambda e: e.type == "tts.audio" and e.turn_id == first_turn and e.seq >= 16)
        await send_frames(actor, frames_of(speech("What time is it?") + silence(1200)), stream="barge-in")
        start = await t.wait_for(lambda e: e.type == "vad.speech_start")
        stop = await t.wait_for(lambda e: e.type == "tts.stop" and e.turn_id == first_turn)
        second = await t.wait_for(lambda e: e.type == "metrics" and e.turn_id == start.turn_id)
    assert stop.reason == "interrupted"
    # the VAD decision and the stop happen on the same input frame
    assert stop.stream_ms == start.stream_ms
    assert stop.ts - start.ts < 0.060, stop.ts - start.ts  # well inside one 60 ms client frame
    i_stop = t.events.index(stop)
    late_audio = [e for e in t.events[i_stop:] if e.type == "tts.audio" and e.turn_id == first_turn]
    assert late_audio == []
    first_metrics = t.of("metrics", first_turn)
    assert first_metrics and first_metrics[0].interrupted
    assert not second.interrupted and "It is" in "".join(e.text for e in t.of("llm.delta", start.turn_id))

    full = "".join(e.text for e in t.of("llm.delta", first_turn)).split()
    history = await actor.history.remote()
    cut = [m for m in history if m["role"] == "assistant" and m["interrupted"]]
    assert len(cut) == 1
    heard = cut[0]["content"].split()
    assert 0 < len(heard) < len(full) and full[:len(heard)] == heard, (heard, full[:12])
    assert history[-1]["role"] == "assistant" and history[-1]["content"].startswith("It is")
    ray.kill(actor.actor)


async def test_explicit_interrupt_cancels_reply(ray_cluster, config, tap):
    actor = await open_actor(config)
    async with tap(actor) as t:
        turn = await actor.send_text.remote("Tell me about the Terracotta Army.")
        await t.wait_for(lambda e: e.type == "tts.audio" and e.turn_id == turn)
        assert await actor.interrupt.remote() is True
        stop = await t.wait_for(lambda e: e.type == "tts.stop" and e.turn_id == turn)
        await asyncio.sleep(0.5)
    assert stop.reason == "interrupted"
    assert not [e for e in t.events[t.events.index(stop):] if e.type == "tts.audio"]
    assert await actor.interrupt.remote() is False  # nothing left to interrupt
    ray.kill(actor.actor)


async def test_out_of_order_and_duplicate_frames(ray_cluster, config, speech, tap):
    actor = await open_actor(config)
    frames = frames_of(silence(300) + speech(QUESTION) + silence(1200))
    shuffled = []
    for i in range(0, len(frames), 4):  # every group of four arrives backwards
        shuffled.extend(reversed(frames[i:i + 4]))
    duplicates = frames[3::7]
    mixed = shuffled[:]
    for k, dup in enumerate(duplicates):
        mixed.insert(min(len(mixed), 6 + k * 7), dup)
    async with tap(actor) as t:
        await send_frames(actor, mixed, stream="shuffled", batch=3)
        final = await t.wait_for(lambda e: e.type == "stt.final")
        await t.wait_for(lambda e: e.type == "metrics" and e.turn_id == final.turn_id)
    assert "84" in "".join(e.text for e in t.of("llm.delta", final.turn_id)), final.text
    stats = await actor.stats.remote()
    assert stats["duplicate_frames"] == len(duplicates)
    assert stats["lost_frames"] == 0
    ray.kill(actor.actor)


@pytest.mark.parametrize("frames, rate, code", [
    ([(0, b"\x00\x00" * 480)], 44100, "audio.unsupported_format"),
    ([(0, b"\x00" * 961)], 16000, "audio.odd_length"),
    ([(0, b"\x00\x00" * 40000)], 16000, "audio.frame_too_large"),
    ([(0, b"")], 16000, "audio.empty"),
    ([(-4, b"\x00\x00" * 480)], 16000, "audio.bad_sequence"),
    ([(i, b"\x00\x00" * 10) for i in range(500)], 16000, "audio.batch_too_large"),
])
async def test_bad_audio_gets_error_event_and_session_keeps_working(ray_cluster, config, tap, frames, rate, code):
    actor = await open_actor(config)
    async with tap(actor) as t:
        accepted = await actor.send_audio.remote(frames, rate, "bad")
        err = await t.wait_for(lambda e: e.type == "error")
        assert accepted == 0
        assert err.code == code and err.message
        turn = await actor.send_text.remote("What is two plus two?")
        await t.wait_for(lambda e: e.type == "metrics" and e.turn_id == turn)
    assert "4" in "".join(e.text for e in t.of("llm.delta", turn))
    ray.kill(actor.actor)


async def test_bad_text_gets_error_event(ray_cluster, config, tap):
    actor = await open_actor(config)
    async with tap(actor) as t:
        assert await actor.send_text.remote("   ") is None
        assert (await t.wait_for(lambda e: e.type == "error")).code == "text.empty"
        assert await actor.send_text.remote("x" * 5000) is None
        assert (await t.wait_for(lambda e: e.type == "error" and e.code != "text.empty")).code == "text.too_long"
    assert await actor.history.remote() == []
    ray.kill(actor.actor)


async def test_two_sessions_do_not_see_each_other(ray_cluster, config, speech, tap):
    a, b = await open_actor(config), await open_actor(config)
    sid_a, sid_b = (await a.stats.remote())["session_id"], (await b.stats.remote())["session_id"]
    async with tap(a) as ta, tap(b) as tb:
        await asyncio.gather(
            send_frames(a, frames_of(silence(300) + speech(QUESTION) + silence(1200))),
            b.send_text.remote("My name is Ana."),
        )
        await ta.wait_for(lambda e: e.type == "metrics" and e.turn_id >= 1)
        await tb.wait_for(lambda e: e.type == "metrics" and e.turn_id >= 1)
    assert {e.session_id for e in ta.events} == {sid_a}
    assert {e.session_id for e in tb.events} == {sid_b}
    hist_a = json.dumps(await a.history.remote())
    hist_b = json.dumps(await b.history.remote())
    assert "84" in hist_a and "Ana" not in hist_a
    assert "Ana" in hist_b and "84" not in hist_b
    ray.kill(a.actor)
    ray.kill(b.actor)


async def test_pools_load_each_model_once(ray_cluster, config):
    stt_pool = get_pool("stt", "local-whisper", config)
    before = await stt_pool.stats.remote()
    actors = [await open_actor(config) for _ in range(3)]
    await asyncio.gather(*(a.send_text.remote("What is the date today?") for a in actors))
    await asyncio.sleep(0.2)
    tts_stats = await get_pool("tts", "local-piper", config).stats.remote()
    after = await get_pool("stt", "local-whisper", config).stats.remote()
    assert after["pid"] == before["pid"]
    assert after["models_loaded_in_process"] == 1 and tts_stats["models_loaded_in_process"] == 1
    session_pids = {(await a.stats.remote())["pid"] for a in actors}
    assert len(session_pids) == 3 and before["pid"] not in session_pids and tts_stats["pid"] not in session_pids
    for a in actors:
        ray.kill(a.actor)


async def test_warm_pool_hands_out_started_actors(ray_cluster, config):
    manager = SessionManager(config, warm=2)
    for _ in range(100):  # filled one start at a time
        if manager.warm_ready() == 2:
            break
        await asyncio.sleep(0.1)
    assert manager.warm_ready() == 2
    warm_ids = [ref.session_id for ref, _ in manager._warm]
    actor = await manager.open()
    sid = actor.session_id
    assert sid in warm_ids
    assert await actor.ready.remote() == sid
    for _ in range(100):
        if manager.warm_ready() == 2:
            break
        await asyncio.sleep(0.1)
    assert manager.warm_ready() == 2 and sid not in [r.session_id for r, _ in manager._warm]  # refilled
    resumed = await manager.open(sid)
    assert resumed.session_id == sid and (await resumed.stats.remote())["pid"] == (await actor.stats.remote())["pid"]
    # a resume by id finds the host and counts the session in one directory call
    again_by_id, refused = await manager.resume_admitted(sid, "user:resumer", 1, 100)
    assert refused is None and (await again_by_id.stats.remote())["pid"] == (await actor.stats.remote())["pid"]

    # a device: its first connect binds a warm session to it; when it comes back, the warm session
    # offered with the same directory call goes back to the pool and the device gets its own
    device = f"device:{new_session_id()}"
    first, resumed_flag = await manager.open_alias(device, device, 1, 100)
    assert not resumed_flag and first.session_id != sid
    for _ in range(100):
        if manager.warm_ready() == 2:
            break
        await asyncio.sleep(0.1)
    warm_before = sorted(ref.session_id for ref, _ in manager._warm)
    again, resumed_flag = await manager.open_alias(device, device, 1, 100)
    assert resumed_flag and again.session_id == first.session_id
    assert sorted(ref.session_id for ref, _ in manager._warm) == warm_before  # nothing used up
    assert (await again.stats.remote())["pid"] == (await first.stats.remote())["pid"]  # its host, found in the same call
    # the same call counts the session against its owner's cap: a second device of one owner is
    # refused, and nothing is left behind for it: the warm session it was offered ends (its actor
    # back to the spares, the pool refilled), no actor starts
    for _ in range(100):
        if manager.warm_ready() == 2:
            break
        await asyncio.sleep(0.1)
    offered = manager._warm[0][0]
    with pytest.raises(LimitError) as refused:
        await manager.open_alias(f"device:{new_session_id()}", device, 1, 100)
    assert refused.value.code == "limit.live_sessions" and not manager._starting
    assert offered.session_id not in [r.session_id for r, _ in manager._warm]
    for _ in range(50):  # ended (the close is not awaited): its actor hosts it no longer
        try:
            await offered.ready.remote()
        except SessionMoved:
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("the warm session offered to a refused device was not ended")
    manager.shutdown()
    ray.kill(actor.actor)
    ray.kill(first.actor)


class NodeLoad:
    """A node's busy CPU-seconds as the test sets its load (real time)."""

    def __init__(self, busy_cpus: float) -> None:
        self.busy_cpus, self._at, self._busy = busy_cpus, time.monotonic(), 0.0

    def read(self) -> float:
        now = time.monotonic()
        self._busy += (now - self._at) * self.busy_cpus
        self._at = now
        return self._busy


async def test_the_warm_pool_starts_no_worker_until_the_node_has_an_idle_core(ray_cluster, config):
    """A worker's boot is ~1 s of a core: on a node whose live sessions use
    most of it, the refill waits (server.refill_idle_cpus) rather than make
    their turns wait."""
    config = config.model_copy(update={"server": config.server.model_copy(update={"refill_idle_cpus": 1.25})})
    load = NodeLoad(busy_cpus=1.0)  # two CPUs, one busy: 1.0 idle, under the 1.25 asked
    manager = SessionManager(config, warm=1, node_cpu=NodeCpu(read=load.read, capacity=2.0))
    try:
        await asyncio.sleep(2.5)  # five turns of the pool's thread
        assert not manager._warm and manager.node_cpu.idle_cpus() is not None
        assert abs(manager.node_cpu.idle_cpus() - 1.0) < 0.05
        load.busy_cpus = 0.5
        for _ in range(100):
            if manager.warm_ready() == 1:
                break
            await asyncio.sleep(0.1)
        assert manager.warm_ready() == 1
    finally:
        manager.shutdown()


async def test_a_warm_session_offered_to_a_device_is_not_replaced_while_the_directory_decides(ray_cluster, config):
    """The pool's refill (its own thread, every 0.5 s) could run between a
    device's offer and the directory's answer: it started a replacement, and
    the offer, back unused (the device had a session already), found the pool
    full and was closed: a worker boot (~1 s of CPU) for nothing, and a
    one-off failure of the test above ("nothing used up")."""
    async def two_ready() -> None:
        for _ in range(100):
            if manager.warm_ready() == 2:
                return
            await asyncio.sleep(0.1)
        raise AssertionError("the warm pool did not fill")

    manager = SessionManager(config, warm=2)
    await two_ready()
    device = f"device:{new_session_id()}"
    first, _ = await manager.open_alias(device, device, 1, 100)
    await two_ready()
    warm_before = sorted(ref.session_id for ref, _ in manager._warm)
    offer = await asyncio.to_thread(manager._take_warm_entry, True)  # as open_alias does, before the directory
    assert offer is not None and len(manager._warm) == 1
    await asyncio.to_thread(manager.refill)  # the pool's thread, at that moment
    assert len(manager._warm) == 1  # nothing started to replace the one on offer
    manager._put_back_warm(offer)  # the device had its session: the offer comes back
    assert sorted(ref.session_id for ref, _ in manager._warm) == warm_before
    again, resumed = await manager.open_alias(device, device, 1, 100)
    assert resumed and again.session_id == first.session_id
    assert sorted(ref.session_id for ref, _ in manager._warm) == warm_before and manager._offered == 0
    manager.shutdown()
    ray.kill(first.actor)


async def test_sessions_beyond_the_warm_pool_start_two_at_a_time(ray_cluster, config, monkeypatch):
    """A burst beyond the warm pool: each new actor boots on ~1 s of CPU, so
    at most COLD_STARTS_AT_ONCE start together (the hellos and live sessions
    keep the cores), every one still comes up, and the warm pool's refill
    waits until they have."""
    import actors.session_manager as manager_module

    manager = SessionManager(config, warm=0)
    in_flight, most = 0, 0
    real_open = manager_module.open_session

    async def counted(*args, **kwargs):
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        try:
            return await real_open(*args, **kwargs)
        finally:
            in_flight -= 1

    monkeypatch.setattr(manager_module, "open_session", counted)
    monkeypatch.setattr(manager, "_target", 1)  # a pool to refill, so a refill would start an actor
    starting = [await manager.open_soon() for _ in range(4)]
    await asyncio.sleep(0)  # each start's task has begun
    assert all(s.starts_actor for s in starting) and manager._cold_waiting == 4
    manager.refill()  # as the pool's thread would, while four wait: it starts nothing
    assert manager.warm_ready() == 0 and not manager._warm
    refs = await asyncio.gather(*starting)
    assert most == manager_module.COLD_STARTS_AT_ONCE and manager._cold_waiting == 0
    assert [await r.ready.remote() for r in refs] == [s.session_id for s in starting]
    manager.shutdown()
    for r in refs:
        ray.kill(r.actor)


async def test_a_burst_past_max_starting_sessions_is_refused_at_once(ray_cluster, config):
    """Sessions waiting for a new actor are capped per ingress: the next one
    is refused at once (limit.starting_sessions, 4503, a retry hint) rather
    than closed after 30 s of waiting; a device's refused place goes back to
    the directory, its alias finds the same id on the retry, and new
    sessions start again once the queue ahead has."""
    capped = config.model_copy(update={"limits": config.limits.model_copy(update={"max_starting_sessions": 2})})
    manager = SessionManager(capped, warm=0)
    queued = [await manager.open_soon() for _ in range(2)]
    with pytest.raises(LimitError) as refused:
        await manager.open_soon()
    assert refused.value.code == "limit.starting_sessions" and refused.value.ws_close_code == 4503
    assert refused.value.retry_after_s >= 1.0
    device = f"device:cap-{new_session_id()}"
    with pytest.raises(LimitError):
        await manager.open_alias(device, device, 8, 64)
    assert device not in (await manager.directory.live.remote()).values()
    refs = await asyncio.gather(*queued)
    again, resumed = await manager.open_alias(device, device, 8, 64)
    assert resumed and again.starts_actor
    refs.append(await again)
    assert [await r.ready.remote() for r in refs] == [s.session_id for s in queued] + [again.session_id]
    manager.shutdown()
    for r in refs:
        ray.kill(r.actor)


async def test_a_new_actor_boots_once_the_hellos_in_flight_are_out(ray_cluster, config, monkeypatch):
    """A socket on its way to its hello holds back new actors' boots (each
    ~1 s of CPU) and the warm pool's refill, for at most HELLOS_FIRST_MAX_S."""
    import actors.session_manager as manager_module

    manager = SessionManager(config, warm=0)
    began = []
    real_open = manager_module.open_session

    async def noted(*args, **kwargs):
        began.append(time.monotonic())
        return await real_open(*args, **kwargs)

    monkeypatch.setattr(manager_module, "open_session", noted)
    monkeypatch.setattr(manager, "_target", 1)
    sent = manager.hello_in_flight()
    starting = await manager.open_soon()
    manager.refill()  # as the pool's thread would: a hello is in flight, it starts nothing
    assert not manager._warm
    await asyncio.sleep(0.1)
    assert not began  # the start waits for the hello
    hello_at = time.monotonic()
    sent()
    sent()  # once only
    assert manager.hello_in_flight.count == 0
    ref = await starting
    assert began and began[0] >= hello_at
    # a hello that never goes out holds a start back for HELLOS_FIRST_MAX_S only
    stuck = manager.hello_in_flight()
    t0 = time.monotonic()
    other = await manager.open_soon()
    await other
    assert manager_module.HELLOS_FIRST_MAX_S <= began[1] - t0 < manager_module.HELLOS_FIRST_MAX_S + 30
    stuck()
    manager.shutdown()
    for r in (ref, await other):
        ray.kill(r.actor)


def test_second_driver_sees_the_same_session(ray_cluster, config, cluster_address):
    handle = SessionHandle.open(config=config)
    first = handle.ask_text("My name is Ana.")
    assert "Ana" in first.reply
    script = textwrap.dedent(f"""
        import json, ray
        from actors.config import load_config
        from actors.sessions import SessionHandle
        ray.init(address="{cluster_address}", namespace="{TEST_NAMESPACE}", log_to_driver=False)
        cfg = load_config(env={{"VOICE_ACTORS__SERVER__NAMESPACE": "{TEST_NAMESPACE}"}})
        h = SessionHandle.open("{handle.session_id}", cfg)
        seen = h.history()
        r = h.ask_text("What is my name?")
        print(json.dumps({{"seen": seen, "reply": r.reply}}))
    """)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    data = json.loads(out.stdout.strip().splitlines()[-1])
    assert [m["content"] for m in data["seen"]][:1] == ["My name is Ana."]
    assert "Ana" in data["reply"]
    mine = handle.history()
    users = [m["content"] for m in mine if m["role"] == "user"]
    assert users == ["My name is Ana.", "What is my name?"]
    assert mine[-1]["role"] == "assistant" and "Ana" in mine[-1]["content"]
    handle.close()


async def test_history_survives_a_crashed_session_actor(ray_cluster, config, tap):
    sid = new_session_id()
    actor = await open_session(config, sid)
    async with tap(actor) as t:
        turn = await actor.send_text.remote("My name is Ana.")
        await t.wait_for(lambda e: e.type == "metrics" and e.turn_id == turn)
    await asyncio.sleep(0.3)  # the write follows the turn
    ray.kill(actor.actor)  # a crash: no goodbye, no flush
    for _ in range(50):
        if await find_session(config, sid) is None:
            break
        await asyncio.sleep(0.1)
    revived = await open_session(config, sid)
    history = await revived.history.remote()
    assert [m["content"] for m in history if m["role"] == "user"] == ["My name is Ana."]
    assert "Ana" in history[-1]["content"] and history[-1]["role"] == "assistant"
    async with tap(revived) as t:
        turn = await revived.send_text.remote("What is my name?")
        await t.wait_for(lambda e: e.type == "metrics" and e.turn_id == turn)
    assert "Ana" in "".join(e.text for e in t.of("llm.delta", turn))
    with contextlib.suppress(ray.exceptions.RayActorError):
        await revived.close.remote(True)  # forget: the stored conversation goes too
    for _ in range(50):
        if await find_session(config, sid) is None:
            break
        await asyncio.sleep(0.1)
    fresh = await open_session(config, sid)
    assert await fresh.history.remote() == []
    ray.kill(fresh.actor)


async def test_the_provider_contracts_from_a_notebook_as_the_readme_shows(ray_cluster, config, speech):
    """The README's snippet: the embedded chains driven through the stream contracts."""
    from actors.providers.stages import chained_stt, chained_tts

    stt = chained_stt(config).open_stream(interim_every_s=0.3)
    pcm16 = speech(QUESTION)
    for start in range(0, len(pcm16), 3200):  # 100 ms pieces, as a microphone gives them
        await stt.push(pcm16[start:start + 3200])
        await asyncio.sleep(0.02)
    await stt.end_input()
    events = [event async for event in stt.events()]
    assert events[-1].kind == "end" and all(e.kind in ("interim", "final") for e in events[:-1])
    words = events[-1].text.lower()
    assert ("12" in words or "twelve" in words) and ("7" in words or "seven" in words), events

    speech_stream = chained_tts(config).open_stream()
    speech_stream.push_text("Twelve times seven is eighty-four.")
    assert speech_stream.flush() == 0
    speech_stream.end_input()
    pieces = [piece async for piece in speech_stream]
    assert pieces[-1].final and pieces[-1].error is None
    audio = b"".join(piece.audio.pcm16 for piece in pieces if piece.audio)
    rate = next(piece.audio.sample_rate for piece in pieces if piece.audio)
    assert len(audio) / 2 / rate > 1.0 and rms_dbfs(audio) > -40, "a second or more of audible speech"


async def test_an_ended_sessions_actor_hosts_the_next_session_and_nothing_of_the_first(ray_cluster, config, tap):
    """Session actors are reused (a new Ray actor per session grows the
    long-lived processes for good): the next session gets the process, never
    the first one's conversation, owner or listeners, and a handle to the
    first session cannot reach the second."""

    first = await open_actor(config)
    assert await first.claim.remote("user:alice")
    async with tap(first) as t:
        turn = await first.send_text.remote("My name is Ana.")
        await t.wait_for(lambda e: e.type == "metrics" and e.turn_id == turn)
        pid = (await first.stats.remote())["pid"]
        await first.close.remote()
        closed = await t.wait_for(lambda e: e.type == "error")
    assert closed.code == "session.closed"
    assert await find_session(config, first.session_id) is None

    second = None
    for _ in range(20):  # the spare a new session takes may be another ended one: look for ours
        candidate = await open_actor(config)
        if (await candidate.stats.remote())["pid"] == pid:
            second = candidate
            break
        ray.kill(candidate.actor)
    assert second is not None, "the ended session's actor was not reused"
    stats = await second.stats.remote()
    assert stats["owner"] is None and stats["turn_id"] == 0 and stats["subscribers"] == 0 and stats["hosted"] >= 2
    assert await second.history.remote() == []
    assert await second.claim.remote("user:bob")  # bob may own it: it is new
    for call in (first.send_text.remote("hello?"), first.history.remote(), first.claim.remote("user:alice")):
        with pytest.raises(SessionMoved):
            await call
    assert await second.history.remote() == []  # the stale handle's text never arrived
    # the first session comes back on another actor, from the store, with its conversation
    back = await open_session(config, first.session_id)
    assert back.actor._actor_id != second.actor._actor_id
    assert [m["content"] for m in await back.history.remote() if m["role"] == "user"] == ["My name is Ana."]
    for ref in (second, back):
        await ref.close.remote(True)


async def test_a_live_session_is_found_on_the_same_actor_after_the_directory_restarts(ray_cluster, config):
    """The directory's session → actor map is memory; after a restart it is
    rebuilt from the session actors alive (each says what it hosts), so a
    resuming client reaches its live session, not a second copy of it."""
    from actors.session_directory import session_directory

    ref = await open_actor(config)
    pid = (await ref.stats.remote())["pid"]
    directory = session_directory(config)
    ray.kill(directory, no_restart=False)  # Ray restarts it: its maps start empty
    for _ in range(100):
        try:
            found = await find_session(config, ref.session_id)
            break
        except ray.exceptions.RayActorError:  # a call that reached the dying directory
            await asyncio.sleep(0.1)
    assert found is not None and (await found.stats.remote())["pid"] == pid
    again = await open_session(config, ref.session_id)
    assert again.actor._actor_id == ref.actor._actor_id
    await ref.close.remote()


async def test_the_directory_keeps_spares_up_to_its_cap_and_hands_each_out_once(ray_cluster, config):
    from actors.session_directory import SessionDirectory
    from actors.sessions import new_session_actor

    capped = config.model_copy(update={"server": config.server.model_copy(update={"spare_sessions": 1})})
    directory = SessionDirectory.remote("spare-cap-test", capped)
    a, b, c = new_session_actor(config), new_session_actor(config), new_session_actor(config)
    try:
        assert await directory.recycle.remote(a, "node-1") is True
        assert await directory.recycle.remote(a, "node-1") is True  # already a spare: kept once
        assert await directory.recycle.remote(b, "node-1") is False  # over node-1's cap: b exits instead
        assert await directory.recycle.remote(c, "node-2") is True  # the cap is per node
        assert await directory.holds.remote(a) and not await directory.holds.remote(b)
        # a spare serves its own node's sessions only
        assert await directory.take_spare.remote("node-3") is None
        taken = await directory.take_spare.remote("node-1")
        assert taken._actor_id == a._actor_id and not await directory.holds.remote(a)
        assert await directory.take_spare.remote("node-1") is None
        assert (await directory.take_spare.remote("node-2"))._actor_id == c._actor_id
        counts = await directory.describe.remote()
        assert counts["spares_taken"] == 2 and counts["spares_turned_away"] == 1 and counts["spares"] == 0
    finally:
        for actor in (directory, a, b, c):
            ray.kill(actor)


async def test_a_spare_not_taken_in_time_is_let_go(ray_cluster, config):
    """`server.spare_idle_s`: a spare's own check (`holds`) tells it to go
    once it has waited that long; a newer spare stays."""
    from actors.session_directory import SessionDirectory
    from actors.sessions import new_session_actor

    brief = config.model_copy(update={"server": config.server.model_copy(update={"spare_idle_s": 2.0})})
    directory = SessionDirectory.remote("spare-idle-test", brief)
    old, new = new_session_actor(config), new_session_actor(config)
    try:
        assert await directory.recycle.remote(old, "node-1") is True
        await asyncio.sleep(2.2)
        assert await directory.recycle.remote(new, "node-1") is True
        assert not await directory.holds.remote(old) and await directory.holds.remote(new)
        assert (await directory.take_spare.remote("node-1"))._actor_id == new._actor_id
        assert await directory.take_spare.remote("node-1") is None  # the one let go is not handed out
        assert (await directory.describe.remote())["spares_expired"] == 1
    finally:
        for actor in (directory, old, new):
            ray.kill(actor)


def test_the_vad_model_loads_only_when_someone_speaks_and_decides_the_same(ray_cluster, speech):
    """Silero and numpy are ~6 MB per session process: an idle (warm, spare)
    session never loads them; `prepare` (run in a thread when a client arrives) and a
    first speech frame load the same model and give the same decisions."""
    from actors.audio import silence, split_frames
    from actors.providers.local.vad import TwoStageVAD

    frames = [f for f in split_frames(silence(600) + speech(QUESTION) + silence(600), 30) if len(f) == 960]
    lazy, prepared = TwoStageVAD(), TwoStageVAD()
    assert lazy._silero is None and prepared._silero is None
    prepared.prepare()
    prepared.prepare()  # idempotent
    assert prepared._silero is not None
    silent = [lazy.is_speech(f) for f in split_frames(silence(600), 30)]
    assert not any(silent) and lazy._silero is None  # silence never opens the gate: nothing loaded
    lazy.reset()
    decisions = [lazy.is_speech(f) for f in frames], [prepared.is_speech(f) for f in frames]
    assert decisions[0] == decisions[1] and sum(decisions[0]) > 20 and lazy._silero is not None


def _interpreter(_actor) -> dict:
    """Run inside a session actor (`__ray_call__`): how its Python runs."""
    import importlib.util
    import os
    import sys

    import actors.session

    return {"optimize": sys.flags.optimize, "prefix": sys.pycache_prefix, "pid": os.getpid(),
            "session_bytecode": importlib.util.cache_from_source(actors.session.__file__),
            "doc": actors.session.__doc__, "arenas": os.environ.get("MALLOC_ARENA_MAX")}


async def test_session_workers_run_without_docstrings_on_bytecode_of_their_own(ray_cluster, config, tmp_path,
                                                                             monkeypatch):
    """actors/worker_env.py, `server.optimize_session_workers`: ~7 MB a
    session process. Its bytecode is written once, to this user's private
    directory, and read by every later worker; off (the default), or
    without a private directory, a worker runs as the job's do."""
    import stat
    import tempfile

    from actors.sessions import new_session_actor
    from actors.worker_env import session_runtime_env

    plain = config
    assert not plain.server.optimize_session_workers and session_runtime_env(plain) is None
    config = config.model_copy(update={"server": config.server.model_copy(update={"optimize_session_workers": True})})
    first, second = new_session_actor(config), new_session_actor(config)
    try:
        one, two = await first.__ray_call__.remote(_interpreter), await second.__ray_call__.remote(_interpreter)
    finally:
        ray.kill(first)
        ray.kill(second)
    assert one["pid"] != two["pid"]
    for seen in (one, two):
        assert seen["optimize"] == 2 and seen["doc"] is None and seen["arenas"] == "2", seen
        assert seen["prefix"] == session_runtime_env(config)["env_vars"]["PYTHONPYCACHEPREFIX"]
    cache = os.path.dirname(seen["prefix"])
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o700 and os.stat(cache).st_uid == os.getuid()
    # the session's own module, compiled without docstrings, under the prefix
    assert seen["session_bytecode"].startswith(seen["prefix"] + "/"), seen
    assert seen["session_bytecode"].endswith(".opt-2.pyc") and os.path.exists(seen["session_bytecode"])
    assert stat.S_IMODE(os.stat(seen["prefix"]).st_mode) == 0o700

    actor = new_session_actor(plain)
    try:
        seen = await actor.__ray_call__.remote(_interpreter)
    finally:
        ray.kill(actor)
    assert seen["optimize"] == 0 and seen["doc"], seen

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    (tmp_path / f"voice-actors-{os.getuid()}").mkdir(mode=0o777)
    os.chmod(tmp_path / f"voice-actors-{os.getuid()}", 0o777)  # another's, or open to all: no cache there
    assert session_runtime_env(config) is None


def _serialization_imports(_actor) -> list[str]:
    """Run inside a session actor (`__ray_call__`)."""
    import sys

    from actors.worker_env import UNSENT_BY_SESSIONS

    return [name for name in UNSENT_BY_SESSIONS if name in sys.modules]


async def test_a_session_worker_builds_rays_serialization_context_without_what_it_never_sends(
        ray_cluster, config, tap):
    """actors/worker_env.py `lean_serialization_context`: 1.9 MB a session
    process. The actor takes no argument (Ray builds the context on the
    first one); its config, a pydantic model, comes with `host`; the hidden
    packages stay importable; a new actor hosted without a config is refused."""
    from actors.sessions import new_session_actor

    actor = await open_actor(config)
    async with tap(actor) as t:
        turn = await actor.send_text.remote("What is twelve times seven?")
        await t.wait_for(lambda e: e.type == "metrics" and e.turn_id == turn)
    assert await actor.actor.__ray_call__.remote(_serialization_imports) == []
    assert await actor.actor.__ray_call__.remote(lambda _: __import__("starlette.datastructures").__name__) == "starlette"
    await actor.close.remote()

    bare = new_session_actor(config)
    try:
        with pytest.raises(ValueError, match="hosted with its config"):
            await bare.host.remote(new_session_id())
        assert await bare.host.remote(new_session_id(), config)  # the refusal changed nothing
    finally:
        ray.kill(bare)


def test_a_node_the_server_starts_caches_bytecode_and_caps_malloc_arenas(monkeypatch, tmp_path):
    """actors/worker_env.py: the raylet, and every worker it starts, inherit
    the prefix; a host's PYTHONDONTWRITEBYTECODE no longer makes each worker
    compile from source. Not into a directory others may enter. Two malloc
    arenas, code without column positions (in a cache of its own) and Ray's
    unused imports deferred (the worker site first on the path) unless the
    host chose otherwise."""
    import stat
    import subprocess
    import sys
    import tempfile

    from actors.worker_env import DEFERRED_IMPORTS, WORKER_SITE, prepare_this_node

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    monkeypatch.delenv("PYTHONPYCACHEPREFIX", raising=False)
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    monkeypatch.delenv("PYTHONNODEBUGRANGES", raising=False)
    monkeypatch.delenv("VOICE_ACTORS_DEFERRED_IMPORTS", raising=False)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(["/opt/host-lib", str(WORKER_SITE)]))
    prepare_this_node()
    assert os.environ["MALLOC_ARENA_MAX"] == "2" and os.environ["PYTHONNODEBUGRANGES"] == "1"
    assert os.environ["VOICE_ACTORS_DEFERRED_IMPORTS"] == DEFERRED_IMPORTS
    assert os.environ["PYTHONPATH"] == os.pathsep.join([str(WORKER_SITE), "/opt/host-lib"]), \
        "the worker site first, once; the host's own path kept"
    cache = tmp_path / f"voice-actors-{os.getuid()}" / "bytecode-no-debug-ranges"
    assert os.environ["PYTHONPYCACHEPREFIX"] == str(cache) and "PYTHONDONTWRITEBYTECODE" not in os.environ
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    module = tmp_path / "probe_module.py"
    module.write_text("def f(x):\n    return x + 1\n")
    columns = "import probe_module; print(sum(p[2] is not None for p in probe_module.f.__code__.co_positions()))"
    for _ in range(2):  # compiled, then read from the cache: no column positions either way
        seen = subprocess.run([sys.executable, "-c", columns], cwd=tmp_path, check=True, capture_output=True,
                              text=True, env={**os.environ, "PYTHONPATH": str(tmp_path)})
        assert seen.stdout.strip() == "0", seen
    assert list(cache.rglob("probe_module*.pyc")), "a child process wrote its bytecode under the prefix"

    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    monkeypatch.delenv("PYTHONPYCACHEPREFIX")
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(open_dir))
    (open_dir / f"voice-actors-{os.getuid()}").mkdir(mode=0o777)
    os.chmod(open_dir / f"voice-actors-{os.getuid()}", 0o777)
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    monkeypatch.setenv("PYTHONNODEBUGRANGES", "")
    monkeypatch.setenv("VOICE_ACTORS_DEFERRED_IMPORTS", "")
    prepare_this_node()
    assert os.environ["VOICE_ACTORS_DEFERRED_IMPORTS"] == "", "the host's choice of no deferred imports"
    assert "PYTHONPYCACHEPREFIX" not in os.environ and os.environ["PYTHONDONTWRITEBYTECODE"] == "1"
    assert os.environ["MALLOC_ARENA_MAX"] == "4", "the host's own number is kept"
    assert os.environ["PYTHONNODEBUGRANGES"] == "", "and its own choice of column positions"
