"""Load generator and report: `python -m bench.run --mode fake --sessions 1,2,4,8`.

Modes: `fake` (fixed-delay providers plugged in by config), `real` (the
embedded models), `cloud-fake` (the cloud providers, DashScope paraformer +
CosyVoice and an OpenAI-compatible LLM, through their real SDKs against
loopback fakes with fixed latencies: bench/cloud_fakes.py).

Starts its own Ray instance and Serve ingress (on 127.0.0.1 only), opens N
concurrent real WebSocket sessions that stream speech in real time (60 ms
frames), and measures per turn and per run. Every figure is also reported
as a ratio to baselines run in the same process: (a) the same session code
driven without Ray, (b) a bare Ray Serve WebSocket echo fed the same frames.
Writes a JSON result and a PNG plot. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

PORT = 18900
ROOT = Path(__file__).resolve().parent.parent
STAGGER_S = 2.0
CLOUD_CONFIG = Path(__file__).resolve().parent.parent / "config" / "cloud-zh.yaml"
FAKE = {"stt": "bench.fakes:FixedDelaySTT", "llm": "bench.fakes:FixedDelayLLM", "tts": "bench.fakes:FixedDelayTTS"}
QUESTION = "What is twelve times seven?"
LONG_QUESTION = "Tell me about the Rosetta Stone."


# ------------------------------------------------------------------ statistics
def prepare_node_environment() -> None:
    """The environment the Ray this process starts should inherit (its
    raylet passes it to every worker): this checkout on the workers' path
    (`bench.fakes` plug-ins, `tests.fakes`), and the server's own bytecode
    cache (actors/worker_env.py, as `connect_ray` does), so workers start as
    in production.

    Not through the job's `runtime_env`: any `runtime_env` makes the raylet
    start every worker through Ray's setup shim, a second interpreter that
    imports all of Ray (+0.27 s of CPU and +0.44 s to a session worker's
    first answer, bench/worker_memory.py), which the server's own job does
    not pay for its plain workers."""
    from actors.worker_env import prepare_this_node, put_first_on_pythonpath

    put_first_on_pythonpath(ROOT)
    prepare_this_node()


def pct(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"n": 0, "p50": None, "p95": None, "p99": None, "max": None}
    a = np.asarray(values, dtype=float)
    return {"n": len(values), "p50": round(float(np.percentile(a, 50)), 1),
            "p95": round(float(np.percentile(a, 95)), 1), "p99": round(float(np.percentile(a, 99)), 1),
            "max": round(float(a.max()), 1)}


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 2)


# ------------------------------------------------------------------ process accounting
def ray_processes() -> list[Any]:
    """The Ray processes of this run: descendants of this process (`ray.init`
    starts GCS and raylet, the raylet starts workers), so another Ray on the
    same machine (a test suite) is not counted."""
    import psutil

    procs = []
    for p in psutil.Process().children(recursive=True):
        try:
            name, cmd = p.name() or "", " ".join(p.cmdline())
        except Exception:
            continue
        if "ray" in name or "ray/" in cmd or "ray::" in cmd:
            procs.append(p)
    return procs


def cpu_seconds(procs: list[Any]) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except Exception:
            pass
    return total


def uss_by_kind() -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for p in ray_processes():
        try:
            cmd = " ".join(p.cmdline())
            kind = cmd.split("ray::", 1)[1].split()[0] if "ray::" in cmd else (p.name() or "other")
            out.setdefault(kind, []).append(p.memory_full_info().uss)
        except Exception:
            pass
    return out


# ------------------------------------------------------------------ fixtures
def speech_fixture(text: str) -> bytes:
    """Real speech from the embedded voice, 16 kHz PCM16, no padding.

    Kept in bench/results/ once made: piper samples its voice, so each
    synthesis differs a little in length, and where the VAD finds the end of
    speech within the last frame moved the measured overhead by tens of ms
    from one run to the next. Delete the file for a new one."""
    import hashlib

    cached = Path(__file__).resolve().parent / "results" / f"speech-{hashlib.sha1(text.encode()).hexdigest()[:12]}.pcm"
    if cached.exists():
        return cached.read_bytes()
    from actors.audio import resample_pcm16
    from actors.providers.local.tts import PiperTTS

    voice = getattr(speech_fixture, "_voice", None) or PiperTTS()
    speech_fixture._voice = voice  # type: ignore[attr-defined]
    seg = voice.synthesize_sync(text)
    pcm = trim_silence(resample_pcm16(seg.pcm16, seg.sample_rate, 16000))
    cached.parent.mkdir(exist_ok=True)
    cached.write_bytes(pcm)
    return pcm


def trim_silence(pcm16: bytes, threshold_dbfs: float = -45.0, window_ms: int = 10) -> bytes:
    """Cut the voice's own leading and trailing quiet, so the fixture's last
    sample is the true end of speech that latency is measured from."""
    x = np.frombuffer(pcm16, dtype="<i2").astype(np.float32) / 32768.0
    win = 16 * window_ms
    n = len(x) // win
    rms = np.sqrt((x[: n * win].reshape(n, win) ** 2).mean(axis=1) + 1e-12)
    loud = np.nonzero(20 * np.log10(rms) > threshold_dbfs)[0]
    if len(loud) == 0:
        return pcm16
    return pcm16[loud[0] * win * 2:(loud[-1] + 1) * win * 2]


# ------------------------------------------------------------------ one run
@dataclass
class RunResult:
    protocol: str
    sessions: int
    e2e_ms: list[float] = field(default_factory=list)
    stt_ms: list[float] = field(default_factory=list)
    llm_ms: list[float] = field(default_factory=list)
    tts_ms: list[float] = field(default_factory=list)
    server_first_audio_ms: list[float] = field(default_factory=list)
    connect_ms: list[float] = field(default_factory=list)
    lags_ms: list[float] = field(default_factory=list)
    barge_ms: list[float] = field(default_factory=list)
    barge_after_decision_ms: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    cpu_cores: float = 0.0
    wall_s: float = 0.0
    session_uss_mb: list[float] = field(default_factory=list)
    ray_uss_mb: float = 0.0
    ray_uss_total_mb: float = 0.0
    # the critical path, split (client clock from the end of speech, and the VAD's own decision)
    vad_end_client_ms: list[float] = field(default_factory=list)
    """End of speech → `vad.speech_end` received (native): VAD wait + uplink batch + transport."""
    vad_wait_audio_ms: list[float] = field(default_factory=list)
    """Audio the VAD heard after the last speech sample before it decided (its `stream_ms`)."""
    transcript_client_ms: list[float] = field(default_factory=list)
    """End of speech → final transcript received (native `stt.final`, xiaozhi `stt`)."""
    eos_to_server_vad_end_ms: list[float] = field(default_factory=list)
    """Client end of speech → first audio, minus the session's own VAD end → first audio sent."""
    first_turn: list[bool] = field(default_factory=list)
    """Parallel to e2e_ms: the session's first spoken turn (first use of each provider client)."""
    llm_first_turn: list[bool] = field(default_factory=list)
    """Parallel to llm_ms."""
    delivered: dict[str, Any] = field(default_factory=dict)
    """Cloud-fake mode: the latencies the fakes really delivered during this run."""


TRAILING_SILENCE_MS = 1200  # what the client's stream_pcm sends after the speech


async def spoken_turns(client: Any, speech: bytes, turns: int, r: RunResult) -> list[Any]:
    """Ask `turns` spoken questions; record end of speech → first audio of each,
    and when the end of speech was detected and transcribed."""
    from actors.audio import silence

    done = []
    pcm = silence(500) + speech
    turn_bytes = len(pcm) + len(silence(TRAILING_SILENCE_MS))
    for k in range(turns):
        seen: dict[str, tuple[float, dict[str, Any]]] = {}

        def on_event(msg: dict[str, Any]) -> None:
            kind = msg.get("type")
            if kind == "vad.speech_end":
                seen["vad_end"] = (time.monotonic(), msg)  # the last one before the reply
            elif kind in ("stt.final", "stt") and "transcript" not in seen:
                seen["transcript"] = (time.monotonic(), msg)

        turn = await client.ask_audio(pcm, on_event=on_event, lags_ms=r.lags_ms, timeout_s=60)
        if turn.end_of_speech_to_first_audio_ms is None or not turn.audio:
            r.failures.append("no reply audio")
            continue
        r.e2e_ms.append(turn.end_of_speech_to_first_audio_ms)
        r.first_turn.append(k == 0)
        turn.bench_first = k == 0  # type: ignore[attr-defined]
        sent = turn.speech_sent_at
        if "vad_end" in seen:
            at, msg = seen["vad_end"]
            r.vad_end_client_ms.append((at - sent) * 1000)
            # the session's stream clock counts every sample this socket sent, turn after turn
            r.vad_wait_audio_ms.append(msg["stream_ms"] - (k * turn_bytes + len(pcm)) / 32)
        if "transcript" in seen:
            r.transcript_client_ms.append((seen["transcript"][0] - sent) * 1000)
        done.append(turn)
    return done


async def native_session(base: str, token: str, speech: bytes, turns: int, r: RunResult, barge: bytes | None,
                         delay_s: float = 0.0) -> None:
    from actors.client import NativeClient

    await asyncio.sleep(delay_s)
    t0 = time.monotonic()
    async with await NativeClient.connect(f"{base}/ws/voice", token) as c:
        r.connect_ms.append((time.monotonic() - t0) * 1000)
        for turn in await spoken_turns(c, speech, turns, r):
            m = next((m for m in turn.messages if m["type"] == "metrics"), {})
            for key, bucket in [("stt_final_ms", r.stt_ms), ("llm_first_token_ms", r.llm_ms),
                                ("tts_first_audio_ms", r.tts_ms), ("first_audio_ms", r.server_first_audio_ms)]:
                if m.get(key) is not None:
                    bucket.append(m[key])
            if m.get("llm_first_token_ms") is not None:
                r.llm_first_turn.append(turn.bench_first)
            if m.get("first_audio_ms") is not None and turn.end_of_speech_to_first_audio_ms is not None:
                r.eos_to_server_vad_end_ms.append(turn.end_of_speech_to_first_audio_ms - m["first_audio_ms"])
        if barge is not None:
            total, after_decision = await barge_in(c, barge)
            r.barge_ms.append(total)
            if after_decision is not None:
                r.barge_after_decision_ms.append(after_decision)


async def barge_in(c: Any, speech: bytes) -> tuple[float, float | None]:
    """Ask for a long reply, talk over it; → (ms from our first speech frame
    to the last audio byte of the cut turn, ms from the frame that completed
    the interruption to that byte). The second is the server's reaction: the
    cut turn's `tts.stop` says where in our audio stream the session decided
    (`stream_ms`, after `vad.min_interruption_ms` of speech), and we know when
    that frame left."""
    from actors.protocols.native import unpack_audio

    await c.send_text("please give me a long answer")
    cut_turn = None
    while cut_turn is None:
        data = await asyncio.wait_for(c.ws.recv(), 30)
        if isinstance(data, bytes):
            cut_turn = unpack_audio(data)[1]
    await asyncio.sleep(0.5)
    started = time.monotonic()
    last_audio = started
    sent: list[tuple[int, float]] = []
    sender = asyncio.create_task(c.stream_pcm(speech, trailing_silence_ms=1200, sent=sent))
    decided_ms = None
    while True:
        data = await asyncio.wait_for(c.ws.recv(), 30)
        if isinstance(data, bytes):
            if unpack_audio(data)[1] == cut_turn:
                last_audio = time.monotonic()
            continue
        msg = json.loads(data)
        if msg["type"] == "tts.stop" and msg["turn_id"] == cut_turn:
            decided_ms = msg.get("stream_ms")
            break
    await sender
    # drain the reply to the barge-in so the socket is quiet for the next run
    with_timeout = time.monotonic() + 30
    while time.monotonic() < with_timeout:
        data = await asyncio.wait_for(c.ws.recv(), 30)
        if isinstance(data, str) and json.loads(data)["type"] == "metrics" and json.loads(data)["turn_id"] != cut_turn:
            break
    deciding = next((t for ms, t in sent if decided_ms is not None and ms >= decided_ms), None)
    return (last_audio - started) * 1000, None if deciding is None else (last_audio - deciding) * 1000


async def xiaozhi_session(base: str, device: str, speech: bytes, turns: int, r: RunResult,
                          delay_s: float = 0.0) -> None:
    import httpx

    from actors.client import XiaozhiClient

    await asyncio.sleep(delay_s)
    t0 = time.monotonic()
    async with httpx.AsyncClient() as http:
        ota = (await http.post(f"http{base[2:]}/xiaozhi/ota/", headers={"Device-Id": device, "Client-Id": device},
                               json={})).json()["websocket"]
    async with await XiaozhiClient.connect(ota["url"], ota["token"], device, client_id=device) as c:
        r.connect_ms.append((time.monotonic() - t0) * 1000)
        await spoken_turns(c, speech, turns, r)


async def wait_for_warm_pool(base: str, timeout_s: float = 90.0) -> None:
    """Each run starts with a full warm pool, so connect → hello measures the
    warm path, not the refill left over from the previous run."""
    import httpx

    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient() as http:
        while time.monotonic() < deadline:
            health = (await http.get(f"http{base[2:]}/health")).json()
            gateway = health["checks"].get("device_gateway", {"warm_sessions_ready": 0, "warm_sessions_target": 0})
            if health["warm_sessions_ready"] >= health["warm_sessions_target"] and \
                    gateway.get("warm_sessions_ready", 0) >= gateway.get("warm_sessions_target", 1):
                return
            await asyncio.sleep(0.5)


async def measured(run: RunResult, coros: list[Any]) -> None:
    idle_total = sum(sum(v) for v in uss_by_kind().values())
    procs = ray_processes()
    cpu0, t0 = cpu_seconds(procs), time.monotonic()
    peak: dict[str, list[int]] = {}
    finished = asyncio.Event()

    async def sample_memory() -> None:
        """The sample with the most session actors, taken every second once every
        session should be open (on a loaded machine one fixed moment can miss them)."""
        nonlocal peak
        await asyncio.sleep(STAGGER_S + 1.5)
        while True:
            sample = uss_by_kind()
            if not peak or len(sample.get("SessionActor", [])) >= len(peak.get("SessionActor", [])):
                peak = sample
            if finished.is_set():
                return
            await asyncio.sleep(1.0)

    sampler = asyncio.create_task(sample_memory())
    results = await asyncio.gather(*coros, return_exceptions=True)
    finished.set()
    await sampler
    run.wall_s = time.monotonic() - t0
    run.cpu_cores = (cpu_seconds(procs) - cpu0) / run.wall_s
    run.failures += [repr(e)[:200] for e in results if isinstance(e, BaseException)]
    run.session_uss_mb = [u / 2 ** 20 for u in peak.get("SessionActor", [])]
    run.ray_uss_total_mb = sum(sum(v) for v in peak.values()) / 2 ** 20
    run.ray_uss_mb = run.ray_uss_total_mb - idle_total / 2 ** 20


# ------------------------------------------------------------------ baselines
async def baseline_no_ray(config: Any, speech: bytes, turns: int) -> list[float]:
    """(a) The same SessionCore, in this process, fed frames at the same cadence."""
    from actors.audio import silence, split_frames
    from actors.providers import build_llm, build_stt, build_tts, build_vad
    from actors.session_core import SessionCore

    core = SessionCore("baseline", config, vad=build_vad(config), stt=build_stt(config.stt.provider, config),
                       llm=build_llm(config.llm.provider, config), tts=build_tts(config.tts.provider, config))
    core.start()
    q = core.subscribe()
    out = []
    batch = max(1, config.ingress.uplink_batch_ms // 60)
    for _ in range(turns):
        frames = split_frames(silence(500) + speech + silence(1200), 60)
        n_speech = len(split_frames(silence(500) + speech, 60))
        start, speech_end = time.monotonic(), None
        for i in range(0, len(frames), batch):
            # a batch leaves once its last frame has been "recorded", as in the ingress
            await asyncio.sleep(max(0.0, start + (i + batch) * 0.06 - time.monotonic()))
            if i + batch >= n_speech and speech_end is None:
                speech_end = start + n_speech * 0.06
            core.send_audio([(None, f) for f in frames[i:i + batch]])
        first = None
        while True:
            ev = await asyncio.wait_for(q.get(), 60)
            if ev.type == "tts.audio" and first is None:
                first = (time.monotonic() - speech_end) * 1000
                out.append(first)
            if ev.type == "metrics" and ev.turn_id == core.turn_id:
                break
    await core.close()
    return out


async def stream_only(url: str, n: int, seconds: float, headers: dict[str, str] | None, hello: str | None,
                      echo: bool) -> dict[str, Any]:
    """N sockets each sending 60 ms PCM frames of silence in real time: the
    per-socket cost of the uplink alone (ours vs the echo floor)."""
    from websockets.asyncio.client import connect

    frame = b"\x00\x00" * 960
    rtts: list[float] = []
    lags: list[float] = []

    async def one() -> None:
        async with connect(url, additional_headers=headers, proxy=None, max_size=2 ** 22) as ws:
            if hello:
                await ws.send(hello)
                await ws.recv()
            start = time.monotonic()
            k = 0
            while time.monotonic() - start < seconds:
                lags.append(max(0.0, (time.monotonic() - (start + k * 0.06)) * 1000))
                sent = time.monotonic()
                await ws.send(frame)
                if echo:
                    await ws.recv()
                    rtts.append((time.monotonic() - sent) * 1000)
                k += 1
                await asyncio.sleep(max(0.0, start + k * 0.06 - time.monotonic()))

    procs = ray_processes()
    cpu0, t0 = cpu_seconds(procs), time.monotonic()
    await asyncio.gather(*(one() for _ in range(n)))
    cores = (cpu_seconds(procs) - cpu0) / (time.monotonic() - t0)
    return {"sessions": n, "cpu_pct_of_core_per_session": round(100 * cores / n, 2),
            "uplink_lag_ms": pct(lags), "echo_rtt_ms": pct(rtts) if echo else None}


# ------------------------------------------------------------------ orchestration
def build_config(opts: argparse.Namespace) -> Any:
    from pydantic import SecretStr

    from actors.config import load_config

    env = {"VOICE_ACTORS__SERVER__NAMESPACE": "voice-actors-bench",
           "VOICE_ACTORS__SERVER__WARM_SESSIONS": str(min(8, max(opts.sessions))),
           "VOICE_ACTORS__LIMITS__MAX_SESSIONS_PER_CLIENT": "10000",
           # every bench socket is one principal ("bench"): lift the per-principal session cap
           "VOICE_ACTORS__LIMITS__MAX_LIVE_SESSIONS_PER_PRINCIPAL": "10000",
           "VOICE_ACTORS__LIMITS__REQUESTS_PER_MINUTE": "100000", "VOICE_ACTORS__LIMITS__BURST": "10000",
           "VOICE_ACTORS__INGRESS__UPLINK_BATCH_MS": str(opts.uplink_batch_ms),
           "VOICE_ACTORS__SESSION__PREEMPTIVE_GENERATION": "false" if opts.no_preemptive else "true",
           "VOICE_ACTORS__STT__DECODE_AT_PAUSE": "false" if opts.no_decode_at_pause else "true",
           "VOICE_ACTORS__INGRESS__GATEWAY_PORT": str(opts.gateway_port)}
    if opts.mode == "fake":
        # fakes only sleep: no pool queueing, so the server's own overhead is all that is left
        env.update({"VOICE_ACTORS__STT__PROVIDER": FAKE["stt"], "VOICE_ACTORS__LLM__PROVIDER": FAKE["llm"],
                    "VOICE_ACTORS__TTS__PROVIDER": FAKE["tts"], "VOICE_ACTORS__TTS__FALLBACK": "none",
                    "VOICE_ACTORS__POOLS__STT__MAX_CONCURRENCY": "64",
                    "VOICE_ACTORS__POOLS__TTS__MAX_CONCURRENCY": "64"})
    path = None
    if opts.mode == "cloud-fake":
        # the deployed cloud configuration (config/cloud-zh.yaml), its endpoints pointed at the loopback
        # fakes; keys come from DASHSCOPE_API_KEY as in production. No TTS fallback: a failure must show.
        path = CLOUD_CONFIG
        env.update({"VOICE_ACTORS__STT__DASHSCOPE__WEBSOCKET_URL": opts.fakes.dashscope_url,
                    "VOICE_ACTORS__TTS__DASHSCOPE__WEBSOCKET_URL": opts.fakes.dashscope_url,
                    "VOICE_ACTORS__LLM__OPENAI_COMPAT__BASE_URL": opts.fakes.openai_base_url,
                    "VOICE_ACTORS__TTS__FALLBACK": "none"})
    # any setting can be tried from the command line: VOICE_ACTORS__TTS__CHUNK_MS=240 python -m bench.load ...
    env.update({k: v for k, v in os.environ.items() if k.startswith("VOICE_ACTORS__")})
    config = load_config(path, env=env)
    auth = config.auth.model_copy(update={"jwt_secret": SecretStr("bench-secret-" + "x" * 32),
                                          "device_secret": SecretStr("bench-device-" + "x" * 32)})
    return config.model_copy(update={"auth": auth})


async def run_all(opts: argparse.Namespace) -> dict[str, Any]:
    import ray
    from ray import serve

    from actors.ingress.auth import Authenticator
    from actors.pools import ensure_pools
    from actors.runtime import RAY_SYSTEM_CONFIG
    from bench.cloud_fakes import API_KEY
    from bench.echo_app import echo_app
    from bench.fakes import known_delay_ms
    from serve_app import build_app

    prepare_node_environment()
    if opts.mode == "cloud-fake":
        os.environ["DASHSCOPE_API_KEY"] = API_KEY  # the fakes' key, not a real one; the raylet inherits it
    config = build_config(opts)
    started = time.monotonic()
    print(f"[bench] starting Ray and Serve ({opts.mode} providers)...", flush=True)
    ray.init(address="local", include_dashboard=False, namespace=config.server.namespace, log_to_driver=False,
             _system_config=RAY_SYSTEM_CONFIG)
    ensure_pools(config)
    serve.start(http_options={"host": "127.0.0.1", "port": opts.port})
    serve.run(build_app(config), name="voice-actors", route_prefix="/")
    serve.run(echo_app, name="echo", route_prefix="/echo")
    base = f"ws://127.0.0.1:{opts.port}"
    # native sessions connect to the device gateway when it is on; xiaozhi devices learn its URL from the OTA
    sockets = f"ws://127.0.0.1:{opts.gateway_port}" if opts.gateway_port else base
    print(f"[bench] {len(ray_processes())} Ray processes belong to this run", flush=True)
    token = Authenticator(config.auth).issue_token("bench")
    speech = speech_fixture(QUESTION)
    print(f"[bench] up in {time.monotonic() - started:.1f} s; fixture {len(speech) / 32000:.2f} s of speech",
          flush=True)

    runs: list[RunResult] = []
    for protocol in opts.protocols:
        for n in opts.sessions:
            run = RunResult(protocol, n)
            print(f"[bench] {protocol}: {n} session(s) x {opts.turns} turn(s)...", flush=True)
            await wait_for_warm_pool(base)
            # users do not finish speaking in the same 60 ms: spread the starts over one utterance
            delays = [i * STAGGER_S / n for i in range(n)]
            if protocol == "native":
                barge = speech if opts.barge_in else None
                coros = [native_session(sockets, token, speech, opts.turns, run, barge, d) for d in delays]
            else:
                coros = [xiaozhi_session(base, f"02:00:00:00:{i // 256:02x}:{i % 256:02x}", speech, opts.turns, run,
                                         d) for i, d in enumerate(delays)]
            await measured(run, coros)
            runs.append(run)
            s = pct(run.e2e_ms)
            print(f"[bench]   end of speech -> first audio p50 {s['p50']} ms p99 {s['p99']} ms; "
                  f"cpu {100 * run.cpu_cores / n:.1f}% of a core per session; failures {len(run.failures)}",
                  flush=True)
            if run.barge_ms:
                b, a = pct(run.barge_ms), pct(run.barge_after_decision_ms)
                print(f"[bench]   barge-in: speech start -> last cut audio byte p50 {b['p50']} ms; the deciding "
                      f"frame -> last cut audio byte p50 {a['p50']} p99 {a['p99']} ms (n={a['n']})", flush=True)
            if opts.mode == "cloud-fake":
                run.delivered = opts.fakes.stats()
                vad, tr = pct(run.vad_end_client_ms), pct(run.transcript_client_ms)
                o = pct([x - opts.latencies.provider_time_ms for x in run.e2e_ms])
                print(f"[bench]   provider time {opts.latencies.provider_time_ms:.0f} ms; overhead p50 {o['p50']} "
                      f"p99 {o['p99']} ms; end of speech -> VAD end p50 {vad['p50']} ms, -> transcript p50 "
                      f"{tr['p50']} ms", flush=True)

    print("[bench] baseline (a): session code without Ray...", flush=True)
    no_ray = await baseline_no_ray(config, speech, max(3, opts.turns))
    stream_n = opts.stream_sessions
    print(f"[bench] baseline (b): {stream_n} sockets streaming to the Serve echo vs /ws/voice...", flush=True)
    hello = json.dumps({"type": "hello", "version": 1})
    ours_stream = await stream_only(f"{base}/ws/voice", stream_n, opts.stream_seconds,
                                    {"Authorization": f"Bearer {token}"}, hello, echo=False)
    echo_stream = await stream_only(f"{base}/echo/", stream_n, opts.stream_seconds, None, None, echo=True)

    pause_ms = config.vad.pause_ms if config.stt.decode_at_pause and config.vad.pause_ms < config.vad.end_silence_ms \
        else None
    known = {"fake": known_delay_ms(config.vad.end_silence_ms, pause_ms, config.session.preemptive_generation),
             "cloud-fake": opts.latencies.provider_time_ms if opts.mode == "cloud-fake" else None}.get(opts.mode)
    report = make_report(opts, config, runs, no_ray, ours_stream, echo_stream, known)
    serve.shutdown()
    ray.shutdown()
    return report


def make_report(opts: argparse.Namespace, config: Any, runs: list[RunResult], no_ray: list[float],
                ours_stream: dict, echo_stream: dict, known_ms: float | None) -> dict[str, Any]:
    base_no_ray = pct(no_ray)
    out_runs = []
    single: dict[str, float | None] = {}
    for r in runs:
        e2e = pct(r.e2e_ms)
        if r.sessions == min(opts.sessions):
            single[r.protocol] = e2e["p99"]
        overhead = pct([x - known_ms for x in r.e2e_ms]) if known_ms is not None else None
        cloud = {}
        if opts.mode == "cloud-fake":
            assert known_ms is not None
            cloud = {
                # what the server adds when its VAD wait is not counted (comparable to fake mode's overhead)
                "server_overhead_excl_vad_wait_ms": pct([x - known_ms - config.vad.end_silence_ms for x in r.e2e_ms]),
                "delivered_provider_latencies_ms": r.delivered,
            }
        out_runs.append({
            "protocol": r.protocol, "sessions": r.sessions, "turns": len(r.e2e_ms), "failures": r.failures[:5],
            "end_of_speech_to_first_audio_ms": e2e,
            "server_first_audio_ms": pct(r.server_first_audio_ms), "stt_final_ms": pct(r.stt_ms),
            "llm_first_token_ms": pct(r.llm_ms), "tts_first_audio_ms": pct(r.tts_ms),
            "server_overhead_ms": overhead, **cloud,
            "critical_path": {
                "end_of_speech_to_vad_end_ms": pct(r.vad_end_client_ms),
                "vad_wait_audio_ms": pct(r.vad_wait_audio_ms),
                "end_of_speech_to_final_transcript_ms": pct(r.transcript_client_ms),
                "end_of_speech_to_server_vad_end_ms": pct(r.eos_to_server_vad_end_ms),
            },
            "by_turn": {
                "first_turn_end_of_speech_to_first_audio_ms": pct([x for x, f in zip(r.e2e_ms, r.first_turn) if f]),
                "later_turns_end_of_speech_to_first_audio_ms": pct([x for x, f in zip(r.e2e_ms, r.first_turn)
                                                                     if not f]),
                "first_turn_llm_first_token_ms": pct([x for x, f in zip(r.llm_ms, r.llm_first_turn) if f]),
                "later_turns_llm_first_token_ms": pct([x for x, f in zip(r.llm_ms, r.llm_first_turn) if not f]),
            },
            "barge_in_reaction_ms": pct(r.barge_ms),
            "barge_in_after_decision_ms": pct(r.barge_after_decision_ms),
            "connect_to_hello_ms": pct(r.connect_ms), "uplink_frame_lag_ms": pct(r.lags_ms),
            "cpu_pct_of_core_per_session": round(100 * r.cpu_cores / r.sessions, 2),
            "session_actor_uss_mb": round(statistics.mean(r.session_uss_mb), 1) if r.session_uss_mb else None,
            # the run's sessions are the largest session actors (the rest are warm spares)
            "live_session_actor_uss_mb": round(statistics.mean(sorted(r.session_uss_mb)[-r.sessions:]), 1)
            if r.session_uss_mb else None,
            "ray_uss_mb_added_per_session": round(r.ray_uss_mb / r.sessions, 1),
            "ray_uss_mb_total_per_session": round(r.ray_uss_total_mb / r.sessions, 1),
            "vs_no_ray_p50": ratio(e2e["p50"], base_no_ray["p50"]), "vs_no_ray_p99": ratio(e2e["p99"], base_no_ray["p99"]),
            "held_real_time": (pct(r.lags_ms)["p99"] or 0) < 60 and not r.failures,
        })
    ceiling = {}
    for proto, p99_single in single.items():
        ok = [r["sessions"] for r in out_runs if r["protocol"] == proto and r["held_real_time"]
              and p99_single and r["end_of_speech_to_first_audio_ms"]["p99"] is not None
              and r["end_of_speech_to_first_audio_ms"]["p99"] <= 1.5 * p99_single]
        ceiling[proto] = max(ok) if ok else None
    return {
        "command": " ".join(["python -m bench.run", *sys.argv[1:]]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "mode": opts.mode,
        "known_provider_delay_ms": known_ms,
        "provider_latencies_ms": opts.latencies.describe() if opts.mode == "cloud-fake" else None,
        "settings": {"uplink_batch_ms": config.ingress.uplink_batch_ms, "end_silence_ms": config.vad.end_silence_ms,
                     "min_interruption_ms": config.vad.min_interruption_ms,
                     "tts_prebuffer_ms": config.tts.prebuffer_ms, "frame_ms": 60,
                     "stt_decode_at_pause": config.stt.decode_at_pause, "vad_pause_ms": config.vad.pause_ms,
                     "providers": {"stt": config.stt.provider, "llm": config.llm.provider, "tts": config.tts.provider}},
        "runs": out_runs,
        "baselines": {"no_ray_end_of_speech_to_first_audio_ms": base_no_ray,
                      "uplink_only_ours": ours_stream, "uplink_only_serve_echo": echo_stream},
        "ratios": {"uplink_cpu_ours_vs_echo": ratio(ours_stream["cpu_pct_of_core_per_session"],
                                                    echo_stream["cpu_pct_of_core_per_session"])},
        "ceiling_sessions_within_1_5x_single_p99": ceiling,
    }


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for proto in sorted({r["protocol"] for r in report["runs"]}):
        rs = [r for r in report["runs"] if r["protocol"] == proto]
        ns = [r["sessions"] for r in rs]
        for q, style in [("p50", "-o"), ("p95", "--s"), ("p99", ":^")]:
            ax1.plot(ns, [r["end_of_speech_to_first_audio_ms"][q] for r in rs], style, label=f"{proto} {q}")
        ax2.plot(ns, [r["ray_uss_mb_added_per_session"] for r in rs], "-o", label=f"{proto}: Ray USS added / N")
        ax2.plot(ns, [r["session_actor_uss_mb"] for r in rs], "--s", label=f"{proto}: session actor USS")
    no_ray = report["baselines"]["no_ray_end_of_speech_to_first_audio_ms"]["p50"]
    if no_ray:
        ax1.axhline(no_ray, color="grey", lw=1, label="no-Ray baseline p50")
    ax1.set(xlabel="concurrent sessions", ylabel="end of speech → first audio (ms)",
            title=f"latency ({report['mode']} providers)")
    ax2.set(xlabel="concurrent sessions", ylabel="MB per session", title="memory")
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    p.add_argument("--mode", choices=("fake", "real", "cloud-fake"), default="fake",
                   help="fake: fixed-delay providers (overhead figures); real: the embedded models; cloud-fake: "
                        "the DashScope and OpenAI-compatible providers through their SDKs against loopback fakes "
                        "with fixed latencies (bench/cloud_fakes.py)")
    p.add_argument("--sessions", default="1,2,4,8", help="concurrent session counts, comma-separated")
    p.add_argument("--protocols", default="native,xiaozhi")
    p.add_argument("--turns", type=int, default=2, help="spoken turns per session")
    p.add_argument("--barge-in", action="store_true", help="also measure barge-in reaction (native)")
    p.add_argument("--uplink-batch-ms", type=int, default=120)
    p.add_argument("--stream-sessions", type=int, default=8)
    p.add_argument("--stream-seconds", type=float, default=10.0)
    p.add_argument("--no-preemptive", action="store_true",
                   help="turn session.preemptive_generation off (the reply waits for the final transcript)")
    p.add_argument("--no-decode-at-pause", action="store_true",
                   help="stt.decode_at_pause off: a batch STT decodes only after the end of speech (for a before/after)")
    p.add_argument("--port", type=int, default=PORT)
    p.add_argument("--gateway-port", type=int, default=0,
                   help="serve the sessions' sockets from the device gateway on this port (ingress.gateway_port)")
    p.add_argument("--out", default="bench/results")
    cloud = p.add_argument_group("cloud-fake latencies (ms)")
    cloud.add_argument("--stt-final-ms", type=float, default=150.0, help="finish-task → final transcript")
    cloud.add_argument("--llm-first-token-ms", type=float, default=300.0, help="request → first SSE event")
    cloud.add_argument("--llm-token-ms", type=float, default=0.0, help="between text deltas")
    cloud.add_argument("--tts-first-audio-ms", type=float, default=200.0, help="text → first audio chunk")
    cloud.add_argument("--tts-chunk-ms", type=float, default=0.0,
                       help="between 100 ms audio chunks (0: as fast as the socket takes them)")
    opts = p.parse_args(argv)
    if opts.stream_sessions < 1:
        p.error("--stream-sessions must be at least 1: the report compares its sockets with the echo's")
    opts.sessions = sorted(int(x) for x in opts.sessions.split(","))
    opts.protocols = [x for x in opts.protocols.split(",") if x]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
    from bench.cloud_fakes import CloudFakes, CloudLatencies

    opts.latencies = CloudLatencies(opts.stt_final_ms, opts.llm_first_token_ms, opts.llm_token_ms,
                                    opts.tts_first_audio_ms, opts.tts_chunk_ms)
    opts.fakes = CloudFakes(opts.latencies).start() if opts.mode == "cloud-fake" else None
    try:
        report = asyncio.run(run_all(opts))
    finally:
        if opts.fakes is not None:
            opts.fakes.stop()
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    json_path, png_path = out / f"bench-{opts.mode}-{stamp}.json", out / f"bench-{opts.mode}-{stamp}.png"
    json_path.write_text(json.dumps(report, indent=2))
    plot(report, png_path)
    print(json.dumps({k: report[k] for k in ("ceiling_sessions_within_1_5x_single_p99", "ratios")}, indent=2))
    print(f"[bench] wrote {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
