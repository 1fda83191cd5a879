"""Provider fault matrix with measured time to recover (issue 12, item 6).

    .venv/bin/python -m bench.faults [--only llm-stall,tts-drop] [--out bench/results]

Each row runs one fault against the loopback fakes of tests/fakes (the DashScope
duplex WebSocket fake and the OpenAI-compatible SSE fake, driven by the real
`dashscope` and `openai` SDKs) through a real session actor, with the stage
chains the row names. Time to recover is from the fault's start (the turn sent
into it, or the speech streamed into it) to the session's next successful
answer: the failover answer, the retried answer, or (no fallback) the next
turn answered once the provider is healthy again. It prints a table and writes
JSON (bench/results/faults-<time>.json). Its own Ray instance and namespace;
no Serve app."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")

NAMESPACE = "voice-actors-faults"
QUESTION = "What is twelve times seven?"


@dataclass
class Row:
    name: str
    provider: str
    fault: str
    chain: str
    client_saw: str = ""
    served_by: str = ""
    recover_ms: float | None = None
    survived: bool = False
    notes: str = ""
    events: list[str] = field(default_factory=list)


def base_config() -> Any:
    from actors.config import load_config

    tmp = Path(tempfile.mkdtemp(prefix="va-faults-"))
    return load_config(env={
        "VOICE_ACTORS__SESSION__HISTORY_DB": str(tmp / "history.sqlite3"),
        "VOICE_ACTORS__MEMORY__URL": f"sqlite:///{tmp / 'memory.sqlite3'}",
        "VOICE_ACTORS__QUICK_REPLIES__CACHE_DIR": str(tmp / "tts-cache"),
        "VOICE_ACTORS__KNOWLEDGE__STORE_DIR": str(tmp / "knowledge"),
        "VOICE_ACTORS__SERVER__NAMESPACE": NAMESPACE,
        "VOICE_ACTORS__SERVER__WARM_SESSIONS": "1",
        "VOICE_ACTORS__SESSION__IDLE_TIMEOUT_S": "600",
    })


def with_llm(config: Any, **openai_compat: Any) -> Any:
    from actors.config import LLMConfig

    dumped = config.llm.model_dump()
    dumped["openai_compat"] = {**dumped["openai_compat"], **openai_compat}
    return config.model_copy(update={"llm": LLMConfig.model_validate(dumped)})


def unpaced(config: Any) -> Any:
    return config.model_copy(update={"tts": config.tts.model_copy(update={"pace": False})})


def summary(t: Any, turn: int | None = None) -> list[str]:
    """The client-visible events of a turn, compacted: error codes with their
    first words, and who served the turn."""
    out = []
    for e in t.events:
        if turn is not None and getattr(e, "turn_id", None) != turn:
            continue
        if e.type == "error":
            out.append(f"error {e.code}" + (f" ({e.message[:70]})" if e.code == "provider.failover" else ""))
    return out


async def run_rows(only: set[str] | None) -> list[Row]:
    import ray

    from actors.audio import resample_pcm16, silence
    from actors.pools import ensure_pools, get_pool
    from tests.conftest import EventTap, frames_of, send_frames
    from tests.fakes.dashscope_server import AsrScript, FakeDashScope, Fault, TtsScript
    from tests.fakes.openai_server import Chunk, FakeOpenAIServer, Script
    from tests.test_cloud_faults import KEY, cloud, end, open_session

    config = base_config()
    ray.init(address="local", num_cpus=2, include_dashboard=False, namespace=NAMESPACE, log_to_driver=False,
             configure_logging=False)
    ensure_pools(config)
    piper = get_pool("tts", "local-piper", config)
    seg = await piper.synthesize.remote(QUESTION)
    speech = resample_pcm16(seg.pcm16, seg.sample_rate, 16000)
    rows: list[Row] = []

    with FakeDashScope(api_key=KEY) as dashscope, FakeOpenAIServer(api_key=KEY) as llm:
        fakes = (dashscope, llm)

        def reset() -> None:
            dashscope.reset()
            llm.requests.clear()
            llm.default = Script.text("Hello from the cloud.")

        async def text_turn(actor: Any, t: Any, text: str = QUESTION, timeout: float = 60) -> tuple[int, Any]:
            turn = await actor.send_text.remote(text)
            metrics = await t.wait_for(lambda e: e.type == "metrics" and e.turn_id == turn, timeout)
            return turn, metrics

        def first_words_ms(t: Any, turn: int, wall: float) -> float:
            """Fault start → the first words of the answer reach the client (event time)."""
            return (t.of("llm.delta", turn)[0].ts - wall) * 1000

        def answered(t: Any, turn: int) -> str:
            return "".join(e.text for e in t.of("llm.delta", turn))

        async def llm_row(row: Row, cfg: Any, setup: Any, heal: Any = None, turns: int = 1) -> None:
            """Send a turn into the fault; recovered when a turn is answered
            (with `heal`, the fault is lifted after the first turn and the
            session's next turn must be answered by the cloud)."""
            reset()
            setup()
            actor = await open_session(cfg)
            async with EventTap(actor) as t:
                events: list[str] = []
                wall = time.time()
                for i in range(turns):
                    turn, metrics = await text_turn(actor, t)
                    events += summary(t, turn)
                    if answered(t, turn) and heal is None and row.recover_ms is None:
                        row.recover_ms = first_words_ms(t, turn, wall)
                        row.served_by = metrics.served_by.get("llm", "")
                if heal is not None:
                    heal()
                    turn, metrics = await text_turn(actor, t)
                    if answered(t, turn) and not summary(t, turn):
                        row.recover_ms = first_words_ms(t, turn, wall)
                        row.served_by = metrics.served_by.get("llm", "") + " (next turn)"
                    events += summary(t, turn)
                row.events = events
                row.client_saw = "; ".join(dict.fromkeys(events)) or "nothing (answer only)"
                row.survived = row.recover_ms is not None
            await end(actor)

        async def error_row(row: Row, cfg: Any) -> None:
            """No fallback and a fault that does not heal (a wrong key): how
            fast the client is told, and that the next turn is still served."""
            reset()
            actor = await open_session(cfg)
            async with EventTap(actor) as t:
                started = time.monotonic()
                turn = await actor.send_text.remote(QUESTION)
                await t.wait_for(lambda e: e.type == "error" and e.turn_id == turn, 60)
                told_ms = (time.monotonic() - started) * 1000
                await t.wait_for(lambda e: e.type == "metrics" and e.turn_id == turn, 60)
                turn2, _ = await text_turn(actor, t, "Hello?")
                row.events = summary(t, turn) + summary(t, turn2)
                row.client_saw = "; ".join(dict.fromkeys(row.events)) + f" on both turns; error after {told_ms:.0f} ms"
                row.notes = "no recovery possible without a key: the session stays open and takes the next turn"
                row.survived = turn2 == turn + 1
            await end(actor)

        async def tts_row(row: Row, fault: Fault) -> None:
            reset()
            dashscope.tts = TtsScript(fault=fault)
            actor = await open_session(cloud(config, fakes, tts_fallback=["local-espeak"]))
            async with EventTap(actor) as t:
                started = time.monotonic()
                turn = await actor.send_text.remote("Say hello.")
                audio = await t.wait_for(lambda e: e.type == "tts.audio" and e.turn_id == turn, 60)
                row.recover_ms = (time.monotonic() - started) * 1000  # the first sentence is heard
                assert audio is not None
                metrics = await t.wait_for(lambda e: e.type == "metrics" and e.turn_id == turn, 60)
                row.served_by = metrics.served_by.get("tts", "")
                dashscope.tts = TtsScript()
                turn2, m2 = await text_turn(actor, t, "Again.")
                row.events = summary(t, turn) + summary(t, turn2)
                row.client_saw = "; ".join(dict.fromkeys(summary(t, turn))) + \
                    f"; next turn spoken by {m2.served_by.get('tts')}"
                row.survived = bool(t.of("tts.audio", turn2))
            await end(actor)

        async def stt_row(row: Row, fault: Fault | None, fallback: list[str]) -> None:
            reset()
            dashscope.asr = AsrScript(sentences=["never finished"], fault=fault)
            actor = await open_session(cloud(config, fakes, stt_fallback=fallback))
            async with EventTap(actor) as t:
                started = time.monotonic()
                await send_frames(actor, frames_of(silence(300) + speech + silence(1000)), realtime=True)
                done = await t.wait_for(
                    lambda e: (e.type == "metrics") or (e.type == "error" and e.code == "stt.failed"), 60)
                if done.type == "metrics":
                    row.recover_ms = (time.monotonic() - started) * 1000
                    row.notes = "from the start of the utterance (3.8 s of speech, streamed in real time)"
                    row.served_by = done.served_by.get("stt", "")
                    row.events = summary(t, done.turn_id)
                else:  # no fallback: the next utterance is recognised once the service is back
                    dashscope.asr = AsrScript(sentences=["twelve times seven"])
                    await send_frames(actor, frames_of(speech + silence(1000), start_seq=10_000), realtime=True)
                    m = await t.wait_for(lambda e: e.type == "metrics" and e.turn_id > done.turn_id, 60)
                    row.recover_ms = (time.monotonic() - started) * 1000
                    row.served_by = m.served_by.get("stt", "") + " (next utterance)"
                    row.notes = "two utterances streamed in real time (~9 s of audio) are most of this"
                    row.events = summary(t)
                row.client_saw = "; ".join(dict.fromkeys(row.events))
                row.survived = True
            await end(actor)

        local = ["local-dialogue"]
        specs: list[tuple[Row, Any]] = [
            (Row("baseline", "openai-compatible", "none (reference turn)", "—"),
             lambda r: llm_row(r, cloud(config, fakes), lambda: None)),
            (Row("llm-500-retried", "openai-compatible", "HTTP 500 once, then OK", "retries=2"),
             lambda r: llm_row(r, cloud(config, fakes, llm_retries=2),
                               lambda: llm.enqueue(Script.error(500), Script.text("Eighty-four.")))),
            (Row("llm-503-failover", "openai-compatible", "HTTP 503 on every request", "→ local-dialogue"),
             lambda r: llm_row(r, cloud(config, fakes, llm_fallback=local),
                               lambda: setattr(llm, "default", Script.error(503)))),
            (Row("llm-429-storm", "openai-compatible", "HTTP 429 on every request (storm), 4 turns",
                 "→ local-dialogue, breaker 2 failures / 6 s"),
             lambda r: llm_row(r, unpaced(cloud(config, fakes, llm_fallback=local, breaker_failures=2,
                                                breaker_reset_s=6.0)),
                               lambda: setattr(llm, "default", Script.error(429, "Too many requests")), turns=4)),
            (Row("llm-bad-key", "openai-compatible", "HTTP 401 (wrong key)", "no fallback"),
             lambda r: error_row(r, cloud(config, fakes, llm_key="sk-wrong-key-000000000000"))),
            (Row("llm-bad-key-failover", "openai-compatible", "HTTP 401 (wrong key)", "→ local-dialogue"),
             lambda r: llm_row(r, cloud(config, fakes, llm_key="sk-wrong-key-000000000000", llm_fallback=local),
                               lambda: None)),
            (Row("llm-first-byte-below", "openai-compatible", "first token after 1.0 s (timeout 2 s)", "—"),
             lambda r: llm_row(r, with_llm(cloud(config, fakes), first_token_timeout_s=2.0),
                               lambda: setattr(llm, "default", Script.text("Eighty-four.", first_token_s=1.0)))),
            (Row("llm-first-byte-above", "openai-compatible", "first token after 4.0 s (timeout 2 s)",
                 "→ local-dialogue"),
             lambda r: llm_row(r, with_llm(cloud(config, fakes, llm_fallback=local), first_token_timeout_s=2.0),
                               lambda: setattr(llm, "default", Script.text("Eighty-four.", first_token_s=4.0)))),
            (Row("llm-stall-no-headers", "openai-compatible", "no status line for 30 s (timeout 2 s)",
                 "→ local-dialogue"),
             lambda r: llm_row(r, with_llm(cloud(config, fakes, llm_fallback=local), first_token_timeout_s=2.0),
                               lambda: setattr(llm, "default", Script.stall(30, headers_first=False)))),
            (Row("llm-stall-mid-reply", "openai-compatible", "stream stalls after 2 words for 30 s (timeout 3 s)",
                 "→ local-dialogue"),
             lambda r: llm_row(r, with_llm(cloud(config, fakes, llm_fallback=local), first_token_timeout_s=2.0,
                                           timeout_s=3.0),
                               lambda: setattr(llm, "default", Script.stall(30, before=["Twelve ", "times "])))),
            (Row("llm-drop-mid-stream", "openai-compatible", "TCP connection reset after 2 chunks (1 word sent)",
                 "→ local-dialogue (not used once words are out); healthy for the next turn"),
             lambda r: llm_row(r, cloud(config, fakes, llm_fallback=local),
                               lambda: llm.enqueue(Script(
                                   chunks=[Chunk(delta={"role": "assistant", "content": ""}),
                                           Chunk(delta={"content": "Twelve "})], end="abort")),
                               heal=lambda: None)),
            (Row("tts-stall", "dashscope cosyvoice", "no audio (stall), first-audio timeout 1 s", "→ local-espeak"),
             lambda r: tts_row(r, Fault("stall"))),
            (Row("tts-task-failed", "dashscope cosyvoice", "task-failed before any audio", "→ local-espeak"),
             lambda r: tts_row(r, Fault("fail", code="InternalError"))),
            (Row("tts-drop", "dashscope cosyvoice", "WebSocket dropped (no close frame) before audio",
                 "→ local-espeak"),
             lambda r: tts_row(r, Fault("drop"))),
            (Row("stt-drop", "dashscope paraformer", "WebSocket dropped after 4 frames", "→ local-whisper"),
             lambda r: stt_row(r, Fault("drop", after=4), ["local-whisper"])),
            (Row("stt-task-failed", "dashscope paraformer", "task-failed after 4 frames", "→ local-whisper"),
             lambda r: stt_row(r, Fault("fail", after=4, code="InternalError"), ["local-whisper"])),
            (Row("stt-task-failed-no-fallback", "dashscope paraformer", "task-failed after 2 frames",
                 "no fallback; service healthy for the next utterance"),
             lambda r: stt_row(r, Fault("fail", after=2, code="ClientError", message="bad audio"), [])),
        ]
        await llm_row(Row("warm-up", "", "", ""), cloud(config, fakes), lambda: None)  # cold imports, not a fault
        for row, run in specs:
            if only and row.name not in only:
                continue
            print(f"… {row.name}", file=sys.stderr, flush=True)
            try:
                await asyncio.wait_for(run(row), 120)
            except Exception as e:  # a row that fails is reported, not fatal to the matrix
                row.survived = False
                row.notes = f"{type(e).__name__}: {str(e)[:200]}"
            rows.append(row)
    with contextlib.suppress(Exception):
        ray.shutdown()
    return rows


def table(rows: list[Row]) -> str:
    lines = ["| fault | provider | chain | client saw (events / codes) | served by | time to recover (ms) | survived |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ttr = f"{r.recover_ms:.0f}" if r.recover_ms is not None else "—"
        saw = r.client_saw + (f" — {r.notes}" if r.notes else "")
        lines.append(f"| {r.name}: {r.fault} | {r.provider} | {r.chain} | {saw} | {r.served_by} | {ttr} | "
                     f"{'yes' if r.survived else 'NO'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="", help="comma-separated row names")
    p.add_argument("--out", default="bench/results")
    opts = p.parse_args(argv)
    started = time.monotonic()
    rows = asyncio.run(run_rows(set(filter(None, opts.only.split(",")))))
    print(table(rows))
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"faults-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"command": "python -m bench.faults " + " ".join(argv or sys.argv[1:]),
                                "seconds": round(time.monotonic() - started, 1),
                                "rows": [asdict(r) for r in rows]}, indent=2))
    print(f"wrote {path} ({time.monotonic() - started:.0f} s)")
    return 0 if all(r.survived for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
