"""The benchmark runs end to end (smallest size) and reports every figure it promises."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from actors.client import FRAME_MS

ROOT = Path(__file__).resolve().parent.parent


def test_bench_smoke_run_writes_results_and_plot(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run(
        [sys.executable, "-m", "bench.run", "--mode", "fake", "--sessions", "1", "--turns", "1",
         "--protocols", "native,xiaozhi", "--barge-in", "--stream-sessions", "1", "--stream-seconds", "2",
         "--port", "18911", "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    [result] = list(tmp_path.glob("bench-fake-*.json"))
    assert list(tmp_path.glob("bench-fake-*.png"))
    report = json.loads(result.read_text())
    native, xiaozhi = report["runs"]
    for run in (native, xiaozhi):
        assert run["failures"] == [] and run["turns"] == 1
        e2e = run["end_of_speech_to_first_audio_ms"]["p50"]
        # fixed fake delays are a floor no real run can beat
        assert e2e > report["known_provider_delay_ms"]
        assert run["connect_to_hello_ms"]["p50"] > 0 and run["uplink_frame_lag_ms"]["n"] > 10
        assert run["cpu_pct_of_core_per_session"] > 0 and run["ray_uss_mb_added_per_session"] is not None
    # the fake STT's 300 ms decode ran at the pause, inside the VAD's 600 ms end-silence wait
    # (stt.decode_at_pause): after the VAD's decision the transcript is there at once; the LLM's
    # fixed delay shows through (stage stamps are wall-clock time.time() while the fakes sleep on
    # the monotonic clock, so a stage can read a fraction of a millisecond short: 399.9 seen)
    assert native["stt_final_ms"]["p50"] < 299, native["stt_final_ms"]
    assert native["llm_first_token_ms"]["p50"] >= 399
    assert native["barge_in_reaction_ms"]["n"] == 1 and native["session_actor_uss_mb"] > 10
    baselines = report["baselines"]
    assert baselines["no_ray_end_of_speech_to_first_audio_ms"]["n"] >= 3
    assert baselines["uplink_only_serve_echo"]["echo_rtt_ms"]["n"] > 10
    assert report["ratios"]["uplink_cpu_ours_vs_echo"] > 0
    assert native["vs_no_ray_p50"] > 0


def test_bench_cloud_fake_mode_reports_provider_time_and_the_critical_path(tmp_path: Path):
    """The cloud providers through their real SDKs against loopback fakes with fixed latencies."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run(
        [sys.executable, "-m", "bench.run", "--mode", "cloud-fake", "--sessions", "1", "--turns", "1",
         "--protocols", "native", "--stream-sessions", "1", "--stream-seconds", "1", "--port", "18912",
         "--stt-final-ms", "120", "--llm-first-token-ms", "250", "--tts-first-audio-ms", "180",
         "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    [result] = list(tmp_path.glob("bench-cloud-fake-*.json"))
    report = json.loads(result.read_text())
    assert report["settings"]["providers"] == {"stt": "dashscope", "llm": "openai-compatible", "tts": "dashscope"}
    assert report["known_provider_delay_ms"] == report["provider_latencies_ms"]["provider_time_ms"] == 120 + 250 + 180
    [run] = report["runs"]
    assert run["failures"] == [] and run["turns"] == 1
    e2e = run["end_of_speech_to_first_audio_ms"]["p50"]
    overhead = run["server_overhead_ms"]["p50"]
    assert e2e > 550 and abs(e2e - 550 - overhead) < 0.2 and overhead >= 0
    # the VAD's end-of-speech wait is still on the critical path: it decides after end_silence_ms of silence
    path = run["critical_path"]
    wait = report["settings"]["end_silence_ms"]
    assert wait <= path["vad_wait_audio_ms"]["p50"] < wait + 400
    # (the client sends each 60 ms frame as its slot begins, so the last silence frame the VAD needs
    # leaves one frame before `wait` has passed; the ingress sends frames within an utterance at once)
    assert path["end_of_speech_to_vad_end_ms"]["p50"] >= wait - FRAME_MS
    assert path["end_of_speech_to_vad_end_ms"]["p50"] < path["end_of_speech_to_final_transcript_ms"]["p50"] < e2e
    assert abs(run["server_overhead_excl_vad_wait_ms"]["p50"] - (overhead - wait)) < 0.2
    # the session's own stage stamps, and the fakes kept their fixed latencies
    assert run["stt_final_ms"]["p50"] >= 119 and run["llm_first_token_ms"]["p50"] >= 249
    delivered = run["delivered_provider_latencies_ms"]
    for key, ms in [("stt_final_ms", 120), ("llm_first_token_ms", 250), ("tts_first_audio_ms", 180)]:
        assert delivered[key]["n"] >= 1 and ms - 1 <= delivered[key]["p50"] < ms + 100, (key, delivered[key])
    assert report["baselines"]["no_ray_end_of_speech_to_first_audio_ms"]["n"] >= 3
    assert run["vs_no_ray_p50"] > 0


def test_soak_report_figures_from_samples(tmp_path: Path):
    """bench/soak.py's summary, CSV and plot from synthetic samples (the soak itself needs
    minutes: `python -m bench.soak --minutes 3 --sessions 4`, docs/reliability.md)."""
    import argparse

    from bench.soak import Load, plot, summarize, write_csv

    def row(t: float, phase: str, long_lived: float, sessions: int) -> dict:
        return {"t_s": t, "phase": phase, "clients_connected": 2 if phase == "run" else 0, "turns": 3,
                "errors": 0, "e2e_p50_ms": 1500.0 + t, "e2e_p99_ms": 1800.0, "uplink_lag_p99_ms": 20.0,
                "session_actors": sessions, "sessions_claimed": sessions - 1, "directory_live": sessions - 1,
                "sockets": 2, "dropped_events": 0, "pool_in_flight": 1,
                "ray_uss_mb": long_lived + 90 * sessions, "ray_rss_mb": 2 * long_lived,
                "long_lived_uss_mb": long_lived, "uss_mb:SessionActor": 90.0 * sessions,
                "procs:SessionActor": sessions, "uss_mb:raylet": 15.0}

    rows = [row(30 * i, "run", 1000 + 5 * i, 3 + i % 2) for i in range(10)] + [row(330, "reap", 1050, 1)]
    load = Load(total_turns=30, total_connects=9, total_resumed=4, total_errors=["turn: no reply audio"])
    opts = argparse.Namespace(minutes=4.5, sample_s=30.0)
    summary = summarize(rows, load, {"leaked_actors": 0}, opts, 2)
    # windows of a third of the run (90 s): samples 0-3 vs 6-9
    assert summary["memory_window_s"] == 90 and summary["samples"] == 10
    assert summary["long_lived_uss"] == {"first_mb": 1007.5, "last_mb": 1037.5, "growth_pct": 2.98}
    assert summary["session_actor_uss_mb_each"] == {"first": 90.0, "last": 90.0}
    assert summary["errors"] == 1 and summary["error_kinds"] == {"turn: no reply audio": 1}
    assert summary["e2e_window_p50_ms"]["first"] == 1500.0 and summary["max_session_actors"] == 4
    write_csv(rows, tmp_path / "soak.csv")
    plot(rows, summary, tmp_path / "soak.png")
    assert (tmp_path / "soak.csv").read_text().count("\n") == len(rows) + 1
    assert (tmp_path / "soak.png").stat().st_size > 10_000


def test_load_generator_replays_whole_opus_frames_and_splits_cpu_by_kind():
    """bench/load: one Opus packet per 60 ms frame, the end of speech on a
    frame boundary, and CPU grouped by what each process is."""
    from actors.audio import silence
    from actors.protocols.opus import OpusDecoder
    from bench.load import LEAD_MS, TRAILING_MS, cpu_split, encoded_turn

    speech = b"\x10\x27\xf0\xd8" * 8000 + b"\x00\x01"  # 1 s of a loud square wave and a stray sample
    packets, frames, n_speech = encoded_turn(speech)
    assert len(packets) == len(frames) and all(len(f) == 1920 for f in frames)
    assert n_speech * 1920 >= LEAD_MS * 32 + len(speech) > (n_speech - 1) * 1920
    assert len(frames) == n_speech + TRAILING_MS // 60
    decoded = OpusDecoder(16000).decode(packets[n_speech // 2])
    assert len(decoded) == 1920 and decoded != silence(60)  # real audio, a frame long
    before = {1: ("SessionActor", 1.0), 2: ("ServeReplica:voice-actors:VoiceIngress", 2.0)}
    after = {1: ("SessionActor", 1.5), 2: ("ServeReplica:voice-actors:VoiceIngress", 2.25),
             3: ("SessionActor", 0.5), 4: ("raylet", 0.1)}  # pid 3 started during the run
    assert cpu_split(before, after) == {"session actors": 1.0, "ingress replica": 0.25,
                                        "Ray and Serve daemons": 0.1}
    after[5] = ("SessionActor", 0.05)  # a spare: the least busy of three session actors, with two sessions
    assert cpu_split(before, after, live=2) == {
        "session actors": 1.0, "session actors (idle: spares)": 0.05, "ingress replica": 0.25,
        "Ray and Serve daemons": 0.1}
    assert cpu_split(before, after, live=1) == {
        "session actors": 0.5, "session actors (idle: spares)": 0.55, "ingress replica": 0.25,
        "Ray and Serve daemons": 0.1}
