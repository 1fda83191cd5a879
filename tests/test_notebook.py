"""SessionHandle as notebooks and scripts use it, against the test cluster:
blocking and awaited forms, inside and outside a running event loop, a
recording with several utterances; and docs/notebook.ipynb executed in a real
Jupyter kernel that joins this session's Ray cluster."""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from actors.audio import read_wav, rms_dbfs, silence
from actors.notebook import SessionHandle
from actors.sessions import TurnResults, find_session

ROOT = Path(__file__).resolve().parent.parent
PARAGRAPH = ("I am reading a short paragraph.", "What is nine plus four?", "What is twelve times seven?")
PAUSE_MS = 1500
"""Longer than vad.end_silence_ms (600): each sentence is an utterance of its own."""


@pytest.fixture(scope="module")
def paragraph(speech: Any) -> bytes:
    """A person reading three sentences with pauses between them."""
    pcm = silence(300)
    for sentence in PARAGRAPH:
        pcm += speech(sentence) + silence(PAUSE_MS)
    return pcm


async def _gone(config: Any, session_id: str, within_s: float = 10.0) -> bool:
    """Whether the session actor has ended (close() lets it exit on its own)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if await find_session(config, session_id) is None:
            return True
        await asyncio.sleep(0.1)
    return False


async def test_blocking_calls_work_inside_a_running_event_loop(ray_cluster, config):
    asyncio.get_running_loop()  # as in a Jupyter kernel: here asyncio.run() would refuse to start
    handle = SessionHandle.open(config=config)
    try:
        result = handle.ask_text("What is twelve times seven?")
        assert "84" in result.reply and not result.interrupted
        assert result.metrics["first_audio_ms"] > 0 and len(result.audio) > 16000
        assert [m["content"] for m in handle.history() if m["role"] == "user"] == ["What is twelve times seven?"]
        assert handle.interrupt() is False  # the reply is over: nothing to cut
    finally:
        handle.close()
    assert await _gone(config, handle.session_id)


async def test_awaited_forms_leave_the_event_loop_free(ray_cluster, config):
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.02)
            ticks += 1

    beat = asyncio.get_running_loop().create_task(ticker())
    try:
        started = time.monotonic()
        handle = await SessionHandle.aopen(config=config)
        result = await handle.aask_text("What is nine plus four?")
        elapsed = time.monotonic() - started
    finally:
        beat.cancel()
    assert "13" in result.reply and result.metrics["first_audio_ms"] > 0
    # a blocking call would have frozen the ticker for the whole turn (> 1 s)
    assert elapsed > 0.5 and ticks >= 0.25 * elapsed / 0.02, (ticks, elapsed)

    asking = asyncio.get_running_loop().create_task(handle.aask_text("Tell me about the Mona Lisa."))
    for _ in range(100):  # until the reply is under way
        if (await handle.actor.stats.remote())["reply_turn"] is not None:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(1.0)
    assert await handle.ainterrupt() is True
    cut = await asking
    assert cut.interrupted and cut.reply.startswith("The Mona Lisa")
    assert len(cut.audio) / 2 / cut.sample_rate < 5  # the whole reply lasts ~20 s
    assert await handle.ainterrupt() is False
    history = await handle.ahistory()
    assert history[-1]["role"] == "assistant" and history[-1]["interrupted"]
    await handle.aclose()
    assert await _gone(config, handle.session_id)


def test_a_recording_with_pauses_returns_every_turn(ray_cluster, config, paragraph):
    handle = SessionHandle.open(config=config)  # no loop runs here: the plain-script path
    try:
        started = time.monotonic()
        turns = handle.ask_audio_turns(paragraph)
        print(f"ask_audio_turns took {time.monotonic() - started:.1f} s")
        assert isinstance(turns, TurnResults) and len(turns) == 3 and not turns.errors
        heard = [t.transcript or "" for t in turns]
        assert "paragraph" in heard[0].lower(), heard
        assert "9" in heard[1] and "4" in heard[1], heard
        assert "12" in heard[2] and ("7" in heard[2] or "seven" in heard[2].lower()), heard
        assert [t.turn_id for t in turns] == [turns[0].turn_id + i for i in range(3)]
        assert all(t.metrics and t.reply for t in turns)  # every turn ended, and each got an answer
        assert turns[0].interrupted  # its long reply was cut short by the next sentence (barge-in)
        last = turns[-1]
        assert not last.interrupted and "84" in last.reply
        assert len(last.audio) > 16000 and rms_dbfs(last.audio) > -35

        with pytest.warns(UserWarning, match="3 utterances"):
            first = handle.ask_audio(paragraph)  # the single-turn form: the first turn
        assert "paragraph" in (first.transcript or "").lower() and first.turn_id == last.turn_id + 1
    finally:
        handle.close()


def test_a_recording_without_speech_has_no_turns(ray_cluster, config):
    handle = SessionHandle.open(config=config)
    try:
        assert handle.ask_audio_turns(silence(1000)) == []
        single = handle.ask_audio(silence(1000))
        assert single.transcript is None and single.reply == "" and not single.errors
        odd = handle.ask_audio_turns(silence(1000) + b"\x00")  # the last frame has an odd byte count
        assert odd == [] and [str(e.code) for e in odd.errors] == ["audio.odd_length"]
    finally:
        handle.close()


def _printed(cell: Any) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("name") == "stdout")


def test_the_notebook_runs_in_a_jupyter_kernel(ray_cluster, config, tmp_path: Path):
    import nbformat
    from nbclient import NotebookClient
    from traitlets.config import Config

    nb = nbformat.read(ROOT / "docs" / "notebook.ipynb", as_version=4)
    gcs = ray_cluster.get_runtime_context().gcs_address
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": gcs,  # join this cluster, never start one
           "VOICE_ACTORS__SERVER__NAMESPACE": config.server.namespace,
           "VOICE_ACTORS__SESSION__HISTORY_DB": str(config.session.history_db)}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="va-kernel-") as sockets:  # short: a socket path has ~100 bytes
        kernel = Config(KernelManager={"transport": "ipc", "ip": os.path.join(sockets, "kernel")})  # no TCP port
        NotebookClient(nb, timeout=180, kernel_name="python3", config=kernel,
                       resources={"metadata": {"path": str(tmp_path)}}).execute(env=env)
    print(f"notebook ran in {time.monotonic() - started:.1f} s")
    out = {cell.id: _printed(cell) for cell in nb.cells if cell.cell_type == "code"}

    assert f"joined the Ray cluster at {gcs}\n" in out["join"]
    assert "the kernel's event loop is running: True" in out["ask-text-blocking"]
    assert "reply: 12 times 7 is 84." in out["ask-text-blocking"]
    assert "reply: 9 plus 4 is 13." in out["ask-text-awaited"]

    transcript = out["ask-wav"].split("transcript:", 1)[1].splitlines()[0]
    assert "12" in transcript and ("7" in transcript or "seven" in transcript.lower())
    assert "reply: 12 times 7 is 84." in out["ask-wav"] and "first_audio_ms" in out["ask-wav"]
    reply_audio = read_wav(tmp_path / "reply.wav")
    assert len(reply_audio) > 16000 and rms_dbfs(reply_audio) > -35

    turn_lines = [line for line in out["ask-wav-turns"].splitlines() if line.startswith("turn ")]
    assert "3 turns" in out["ask-wav-turns"] and len(turn_lines) == 3, out["ask-wav-turns"]
    assert "paragraph" in turn_lines[0] and "(interrupted)" in turn_lines[0]
    assert "84" in turn_lines[2] and "(interrupted)" not in turn_lines[2]
    assert "interrupted: only what was heard" in out["history"]
    assert "a second handle sees the same" in out["history"]
    session_id = out["join"].split("\nsession ", 1)[1].split()[0]
    assert asyncio.run(_gone(config, session_id))  # the last cell closed it
