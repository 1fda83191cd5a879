"""Pre-encoded load: `python -m bench.load --sessions 1,8,16,32 [--protocol xiaozhi|native]` (issue 13).

bench/run.py's clients share the process that measures, and encode (and
decode) Opus for every frame of every session: at 16 sessions the load
generator itself needed a large share of the two cores it measured. Here the
speech is encoded once, and a separate process replays the packets in real
time (60 ms frames, each sent once it has been "recorded") and never decodes
the reply, only notes when its first byte arrives. What the load generator
costs is reported apart (its own CPU time), and the server's CPU is split by
process kind (Serve proxy, ingress replica, session actors, pools, the
session directory, Ray's daemons), per session.

The server is bench/run.py's fake mode (fixed-delay providers; `known` is
the provider and VAD delay a turn cannot beat), so `overhead` = end of speech
→ first audio − known is the server's own time. Figures: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from bench.fakes import LLM_FIRST_TOKEN_S, STT_FINAL_S, TTS_FIRST_AUDIO_S
from bench.run import PORT, QUESTION, pct, ray_processes, speech_fixture, wait_for_warm_pool
from bench.soak import process_kind, server_config, start_ray

C = TypeVar("C")

FRAME_S = 0.06
LEAD_MS = 500
TRAILING_MS = 1200
CONNECT_GAP_S = 1.0
"""Between two sequential connects (`--connects`): devices arrive apart, and
the warm pool refills meanwhile."""


# ------------------------------------------------------------------ the recording, encoded once
def encoded_turn(speech: bytes) -> tuple[list[bytes], list[bytes], int]:
    """→ (Opus packets, PCM frames, frames up to the end of speech) of lead
    silence + speech + trailing silence, 60 ms each."""
    from actors.audio import silence, split_frames
    from actors.protocols.opus import OpusEncoder

    lead = silence(LEAD_MS)
    speech += b"\x00" * (-(len(lead) + len(speech)) % 1920)  # the end of speech is a frame's end
    frames = split_frames(lead + speech + silence(TRAILING_MS), 60)
    encoder = OpusEncoder(16000, 60)
    # the codec holds a little audio back (its look-ahead): two more silent frames push every frame out
    packets = [p for f in frames + [silence(60)] * 2 for p in encoder.encode(f)][:len(frames)]
    assert len(packets) == len(frames), (len(packets), len(frames))
    return packets, frames, (len(lead) + len(speech)) // 1920


# ------------------------------------------------------------------ the load process
async def _turns(c: Any, send_frame: Any, frames: list[bytes], n_speech: int, turns: int,
                 out: dict[str, list[float]], stop_when: Any, before_turn: Any = None) -> None:
    """Stream the recording `turns` times; note end of speech → first reply
    byte, and (native: its events carry `stream_ms`) where the session's VAD
    placed the end of speech (`vad_end_ms`: that frame's departure − the end
    of speech) and the pause whose decode the reply started on. `server_ms`:
    the first reply byte − the fixed-delay fakes' critical path, counted from
    those frames' departures (the later of the end, and the pause + STT +
    LLM; then TTS), so the VAD's own placing of both is not counted."""
    stream_ms = 0  # audio sent on this session so far: the session's `stream_ms` clock
    for turn in range(turns):
        if turn == 1:
            out["first_turn_done"].append(time.monotonic())
        if before_turn is not None:
            await before_turn()
        eos: list[float] = []
        first: list[float] = []
        vad_end: list[int] = []
        pauses: list[int] = []
        sent: list[tuple[int, float]] = []

        async def receive() -> None:
            while True:
                data = await asyncio.wait_for(c.ws.recv(), 60)
                if isinstance(data, bytes):
                    if eos and not first:
                        first.append(time.monotonic())
                    continue
                msg = json.loads(data)
                if msg.get("type") == "vad.speech_end":
                    vad_end.append(msg["stream_ms"])
                elif msg.get("type") == "stt.partial" and msg.get("stream_ms") is not None:
                    pauses.append(msg["stream_ms"])  # the decode of a pause: the reply may start on it
                if stop_when(msg) and first:
                    return

        receiver = asyncio.create_task(receive())
        start = time.monotonic()
        for i, frame in enumerate(frames):
            due = start + (i + 1) * FRAME_S  # a frame leaves once it has been recorded
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            out["lag_ms"].append(max(0.0, (time.monotonic() - due) * 1000))
            await send_frame(frame)
            stream_ms += round(FRAME_S * 1000)
            sent.append((stream_ms, due))
            if i + 1 == n_speech:
                eos.append(due)
        await receiver
        out["e2e_ms"].append((first[0] - eos[0]) * 1000)
        out["eos_at"].append(eos[0])
        decided = next((t for ms, t in sent if vad_end and ms >= vad_end[0]), None)
        if decided is not None:
            out["vad_end_ms"].append((decided - eos[0]) * 1000)
            paused = next((t for ms, t in sent if pauses and ms >= pauses[-1]), None)
            start = decided + STT_FINAL_S + LLM_FIRST_TOKEN_S if paused is None else \
                max(decided, paused + STT_FINAL_S + LLM_FIRST_TOKEN_S)
            out["server_ms"].append((first[0] - start - TTS_FIRST_AUDIO_S) * 1000)
            out["server_eos_at"].append(eos[0])


_OTA_CLIENTS: dict[asyncio.AbstractEventLoop, Any] = {}
"""One HTTP client per load-generator loop, for every device's OTA: making one
costs ~23 ms of CPU (its TLS context, unused over http), and one per device
put the generator at ~0.4 s of CPU in a 0.9 s burst of 16 connects, beside
the server it measures. The loop ends with its process."""


async def _ota_websocket(base: str, device: str) -> dict[str, str]:
    """The device's OTA request (once at boot): → its WebSocket `url` and `token`."""
    import httpx

    loop = asyncio.get_running_loop()
    http = _OTA_CLIENTS.get(loop) or _OTA_CLIENTS.setdefault(loop, httpx.AsyncClient())
    r = await http.post(f"http{base[2:]}/xiaozhi/ota/", headers={"Device-Id": device, "Client-Id": device}, json={})
    return r.json()["websocket"]


async def _patiently(open_socket: Callable[[], Awaitable[C]], out: dict[str, list[float]]) -> C:
    """A client's first connect as a device's: a server busy starting other
    sessions (`limit.starting_sessions`) is tried again after its hint; each
    such refusal is counted (`busy`), and connect → hello includes the waits."""
    from actors.client import ServerBusy, connect_patiently, server_busy

    async def counted() -> C:
        try:
            return await open_socket()
        except ServerBusy:
            out["busy"].append(1.0)
            raise

    return await connect_patiently(counted, timeout_s=120.0, retry=server_busy)


async def _xiaozhi(base: str, device: str, packets: list[bytes], n_speech: int, turns: int,
                   out: dict[str, list[float]], delay_s: float) -> None:
    from actors.client import XiaozhiClient

    await asyncio.sleep(delay_s)
    ota = await _ota_websocket(base, device)
    t0 = time.monotonic()
    async with await _patiently(lambda: XiaozhiClient.connect(ota["url"], ota["token"], device, client_id=device),
                                out) as c:
        out["connect_ms"].append((time.monotonic() - t0) * 1000)
        await _turns(c, c.ws.send, packets, n_speech, turns, out,
                     lambda m: m.get("type") == "tts" and m.get("state") == "stop",
                     lambda: c.listen("start", "auto"))


async def _native(base: str, token: str, frames: list[bytes], n_speech: int, turns: int,
                  out: dict[str, list[float]], delay_s: float) -> None:
    from actors.client import NativeClient

    await asyncio.sleep(delay_s)
    t0 = time.monotonic()
    async with await _patiently(lambda: NativeClient.connect(f"{base}/ws/voice", token), out) as c:  # PCM16 frames
        out["connect_ms"].append((time.monotonic() - t0) * 1000)
        await _turns(c, c.ws.send, frames, n_speech, turns, out, lambda m: m.get("type") == "metrics")


async def _connect_once(protocol: str, base: str, token: str, device: str, session_id: str | None,
                        ota_ms: list[float]) -> tuple[float, str]:
    """One connect → hello and close; → (ms, the session id). The xiaozhi
    OTA request comes first and is not counted in it (a device makes it once
    at boot): its own time goes to `ota_ms`."""
    from actors.client import NativeClient, XiaozhiClient

    if protocol == "xiaozhi":
        t0 = time.monotonic()
        ota = await _ota_websocket(base, device)
        ota_ms.append((time.monotonic() - t0) * 1000)
        t0 = time.monotonic()
        c = await XiaozhiClient.connect(ota["url"], ota["token"], device, client_id=device)
    else:
        t0 = time.monotonic()
        c = await NativeClient.connect(f"{base}/ws/voice", token, session_id=session_id)
    took = (time.monotonic() - t0) * 1000
    sid = c.session_id
    await c.close()
    return took, sid


async def _connects(protocol: str, base: str, serve_base: str, token: str, n: int, burst: int,
                    out: dict[str, list[float]]) -> None:
    """`n` new clients one after another (a gap between them, as devices
    arrive), the same `n` again resuming their sessions, then, once the warm
    pool has refilled after them, `burst` new clients at once, and those
    `burst` again at once, resuming."""
    from bench.run import wait_for_warm_pool

    sids = []
    for i in range(n):
        took, sid = await _connect_once(protocol, base, token, f"02:00:00:02:{i // 256:02x}:{i % 256:02x}", None,
                                        out["new_ota_ms"])
        out["new_ms"].append(took)
        sids.append(sid)
        await asyncio.sleep(CONNECT_GAP_S)
    for i, sid in enumerate(sids):
        took, _ = await _connect_once(protocol, base, token, f"02:00:00:02:{i // 256:02x}:{i % 256:02x}", sid, [])
        out["resumed_ms"].append(took)
        await asyncio.sleep(CONNECT_GAP_S)
    t0 = time.monotonic()
    await wait_for_warm_pool(serve_base)  # a refill's worker boots would otherwise land in the burst
    out["pool_wait_s"].append(time.monotonic() - t0)
    results = await asyncio.gather(*[
        _connect_once(protocol, base, token, f"02:00:00:03:{i // 256:02x}:{i % 256:02x}", None, out["burst_ota_ms"])
        for i in range(burst)])
    out["burst_ms"].extend(took for took, _ in results)
    # the same clients back at once, as after a power cut or a server's restart: admitted, sessions live
    await asyncio.sleep(CONNECT_GAP_S)
    await wait_for_warm_pool(serve_base)
    again = await asyncio.gather(*[
        _connect_once(protocol, base, token, f"02:00:00:03:{i // 256:02x}:{i % 256:02x}", sid, [])
        for i, (_, sid) in enumerate(results)])
    out["burst_back_ms"].extend(took for took, _ in again)


def connect_process(conn: Any, protocol: str, base: str, serve_base: str, token: str, n: int, burst: int) -> None:
    out: dict[str, list[float]] = {"new_ms": [], "resumed_ms": [], "burst_ms": [], "new_ota_ms": [], "burst_ota_ms": [],
                                     "burst_back_ms": [], "pool_wait_s": []}
    cpu0, t0 = time.process_time(), time.monotonic()
    asyncio.run(_connects(protocol, base, serve_base, token, n, burst, out))
    conn.send({**out, "cpu_s": time.process_time() - cpu0, "wall_s": time.monotonic() - t0})
    conn.close()


def load_process(conn: Any, protocol: str, base: str, token: str, media: list[bytes], n_speech: int,
                 sessions: int, turns: int, stagger_s: float) -> None:
    """The load generator's own process: `sessions` clients at once; sends
    back what they saw and the CPU this process used."""
    out: dict[str, list[float]] = {"e2e_ms": [], "eos_at": [], "connect_ms": [], "lag_ms": [], "busy": [],
                                   "vad_end_ms": [], "server_ms": [], "server_eos_at": [], "first_turn_done": []}
    failures: list[str] = []

    async def say_when_steady() -> None:
        """Every session has finished its first turn: the actor starts (the warm pool refilling
        behind the sessions that took its actors) and model loads are behind; the parent measures
        the server's CPU from here (it also reports the whole run's)."""
        while len(out["first_turn_done"]) < sessions:
            await asyncio.sleep(0.1)
        conn.send({"steady": True})

    async def main() -> None:
        asyncio.get_running_loop().create_task(say_when_steady())
        delays = [i * stagger_s / sessions for i in range(sessions)]
        if protocol == "xiaozhi":
            coros = [_xiaozhi(base, f"02:00:00:01:{i // 256:02x}:{i % 256:02x}", media, n_speech, turns, out, d)
                     for i, d in enumerate(delays)]
        else:
            coros = [_native(base, token, media, n_speech, turns, out, d) for d in delays]
        results = await asyncio.gather(*coros, return_exceptions=True)
        failures.extend(repr(e)[:200] for e in results if isinstance(e, BaseException))
        # what a device streaming along sees once no session is starting: turns whose speech ended
        # after every session finished its first turn (each first turn waits for its actor to start)
        steady_from = max(out["first_turn_done"]) if len(out["first_turn_done"]) == sessions else float("inf")
        out["steady_e2e_ms"] = [e2e for e2e, at in zip(out["e2e_ms"], out["eos_at"]) if at >= steady_from]
        out["steady_server_ms"] = [ms for ms, at in zip(out["server_ms"], out["server_eos_at"]) if at >= steady_from]
        # when each steady turn's speech ended, from the steady start (monotonic: the same clock in every process)
        out["steady_from"] = steady_from
        out["steady_turns"] = [[round(at - steady_from, 2), e2e] for e2e, at in zip(out["e2e_ms"], out["eos_at"])
                               if at >= steady_from]
        out["steady_server_turns"] = [[round(at - steady_from, 2), ms]
                                      for ms, at in zip(out["server_ms"], out["server_eos_at"]) if at >= steady_from]

    cpu0, t0 = time.process_time(), time.monotonic()
    asyncio.run(main())
    conn.send({**out, "failures": failures, "cpu_s": time.process_time() - cpu0, "wall_s": time.monotonic() - t0})
    conn.close()


# ------------------------------------------------------------------ the server's CPU, by kind
def cpu_by_pid() -> dict[int, tuple[str, float]]:
    out: dict[int, tuple[str, float]] = {}
    for p in ray_processes():
        try:
            t = p.cpu_times()
            out[p.pid] = (process_kind(p), t.user + t.system)
        except Exception:  # exited meanwhile
            continue
    return out


KINDS = {"ProxyActor": "Serve proxy", "SessionActor": "session actors", "ProviderPool": "provider pools",
         "SessionDirectory": "session directory", "KnowledgePool": "knowledge pool",
         "DeviceGateway": "device gateway"}


def kind_group(kind: str) -> str:
    if kind.startswith("ServeReplica:voice-actors:"):
        return "ingress replica"
    if kind in KINDS:
        return KINDS[kind]
    if kind in ("gcs_server", "raylet", "DashboardAgent", "agent", "log_monitor", "monitor", "runtime_env_agent",
                "dashboard", "ServeController", "ray_client_server"):
        return "Ray and Serve daemons"
    return f"other ({kind})"


def cpu_split(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]],
              live: int | None = None) -> dict[str, float]:
    """CPU seconds per kind group between two snapshots (a process that
    started meanwhile counts from zero). With `live` (the run's sessions),
    only the `live` busiest session actors count as the sessions; the rest
    are counted apart as idle (warm spares, sessions whose client left)."""
    used_by = {pid: max(0.0, cpu - before.get(pid, (kind, 0.0))[1]) for pid, (kind, cpu) in after.items()}
    sessions = sorted((pid for pid, (kind, _) in after.items() if kind_group(kind) == "session actors"),
                      key=lambda pid: used_by[pid], reverse=True)
    idle = set(sessions[live:]) if live is not None else set()
    out: dict[str, float] = {}
    for pid, (kind, _) in after.items():
        group = "session actors (idle: spares)" if pid in idle else kind_group(kind)
        out[group] = out.get(group, 0.0) + used_by[pid]
    return out


def booted_session_pids(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> list[int]:
    """Session actors whose worker started, or was still booting, between two
    snapshots (a warm-pool refill overlapping the figures taken between them)."""
    return [pid for pid, (kind, _) in after.items()
            if kind_group(kind) == "session actors" and kind_group(before.get(pid, ("", 0.0))[0]) != "session actors"]


def started_at(pids: list[int], since: float) -> list[float]:
    """When these processes started, in seconds after `since` (time.monotonic)."""
    import psutil

    wall_minus_monotonic = time.time() - time.monotonic()
    out = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            out.append(round(psutil.Process(pid).create_time() - wall_minus_monotonic - since, 2))
    return sorted(out)


async def _boot_sessions(config: Any, n: int, booted: list[Any]) -> None:
    """Start `n` session actors one after another from this process, each
    hosting a session no client takes: the node's cost of a warm-pool refill
    (a worker's boot, the raylet's and GCS's share) without the ingress's
    part of it (`--boots-when-steady`)."""
    from actors.sessions import new_session_actor, new_session_id

    for _ in range(n):
        actor = new_session_actor(config)
        booted.append(actor)
        await actor.host.remote(new_session_id(), config)


# ------------------------------------------------------------------ orchestration
async def run(opts: argparse.Namespace) -> dict[str, Any]:
    import ray
    from ray import serve

    from actors.ingress.auth import Authenticator
    from actors.pools import ensure_pools
    from bench.fakes import known_delay_ms
    from serve_app import build_app

    config = server_config("fake", max(opts.sessions or [8]), "voice-actors-load", 120.0, opts.uplink_batch_ms)
    if opts.warm is not None:
        config = config.model_copy(update={"server": config.server.model_copy(update={"warm_sessions": opts.warm})})
    if opts.gateway_port:  # device sockets through the per-node gateway (the OTA hands out its URL)
        config = config.model_copy(update={"ingress": config.ingress.model_copy(
            update={"gateway_port": opts.gateway_port})})
    start_ray(config.server.namespace)
    ensure_pools(config)
    serve.start(http_options={"host": "127.0.0.1", "port": opts.port})
    serve.run(build_app(config), name="voice-actors", route_prefix="/")
    base = f"ws://127.0.0.1:{opts.port}"
    # native clients connect to the gateway when it is on; xiaozhi devices learn its URL from the OTA,
    # asked of Serve or (`--ota gateway`) of the gateway's own port
    on_gateway = opts.gateway_port and (opts.protocol == "native" or opts.ota == "gateway")
    client_base = f"ws://127.0.0.1:{opts.gateway_port}" if on_gateway else base
    token = Authenticator(config.auth).issue_token("load")
    packets, frames, n_speech = encoded_turn(speech_fixture(QUESTION))
    media = packets if opts.protocol == "xiaozhi" else frames
    pause_ms = config.vad.pause_ms if config.stt.decode_at_pause and config.vad.pause_ms < config.vad.end_silence_ms \
        else None
    known = known_delay_ms(config.vad.end_silence_ms, pause_ms, config.session.preemptive_generation)
    print(f"[load] {opts.protocol}; known provider + VAD delay {known:.0f} ms; {len(media)} frames a turn "
          f"({n_speech} to the end of speech), encoded once", flush=True)
    report: dict[str, Any] = {"protocol": opts.protocol, "ota": opts.ota, "known_ms": known, "turns": opts.turns,
                              "warm_sessions": config.server.warm_sessions,
                              "boots_when_steady": opts.boots_when_steady, "runs": []}
    try:
        if opts.connects:
            await wait_for_warm_pool(base)
            burst = 2 * config.server.warm_sessions
            recv, send = multiprocessing.get_context("spawn").Pipe(duplex=False)
            proc = multiprocessing.get_context("spawn").Process(
                target=connect_process, args=(send, opts.protocol, client_base, base, token, opts.connects, burst))
            before = cpu_by_pid()
            proc.start()
            result = await asyncio.to_thread(recv.recv)
            split = {k: round(v, 2) for k, v in sorted(cpu_split(before, cpu_by_pid()).items()) if v >= 0.005}
            proc.join(10)
            row = {k: pct(result[k]) for k in ("new_ms", "resumed_ms", "burst_ms", "burst_back_ms", "new_ota_ms",
                                               "burst_ota_ms")}
            pool_wait = round(result["pool_wait_s"][0], 1)
            report["connects"] = {**row, "n": opts.connects, "burst": burst, "server_cpu_s": split,
                                  "warm_pool_refill_wait_before_burst_s": pool_wait}
            print(f"[load] connect -> hello, {opts.connects} one after another: new p50 {row['new_ms']['p50']} "
                  f"p99 {row['new_ms']['p99']} ms; resumed p50 {row['resumed_ms']['p50']} p99 "
                  f"{row['resumed_ms']['p99']} ms; a burst of {burst} new (after {pool_wait} s for the warm pool "
                  f"to refill): p50 {row['burst_ms']['p50']} "
                  f"p99 {row['burst_ms']['p99']} ms; the same {burst} back at once (resuming): p50 "
                  f"{row['burst_back_ms']['p50']} p99 {row['burst_back_ms']['p99']} ms", flush=True)
            if opts.protocol == "xiaozhi":
                print(f"[load]   their OTA requests (before connect, not in the figures above; asked of "
                      f"{opts.ota if opts.gateway_port else 'serve'}): one after another p50 "
                      f"{row['new_ota_ms']['p50']} p99 {row['new_ota_ms']['p99']} ms; the burst's p50 "
                      f"{row['burst_ota_ms']['p50']} p99 {row['burst_ota_ms']['p99']} ms", flush=True)
            print(f"[load]   server CPU over the connects, actor starts included: {split} s", flush=True)
        for n in opts.sessions:
            await wait_for_warm_pool(base)
            recv, send = multiprocessing.get_context("spawn").Pipe(duplex=False)
            proc = multiprocessing.get_context("spawn").Process(
                target=load_process, args=(send, opts.protocol, client_base, token, media, n_speech, n, opts.turns,
                                           opts.stagger_s))
            first, t_first = cpu_by_pid(), time.monotonic()
            proc.start()
            result = await asyncio.to_thread(recv.recv)
            before, t0 = first, t_first
            booted: list[Any] = []
            if result.get("steady"):  # from here on: every session past its first turn
                before, t0 = cpu_by_pid(), time.monotonic()
                boots = asyncio.get_running_loop().create_task(_boot_sessions(config, opts.boots_when_steady, booted))
                result = await asyncio.to_thread(recv.recv)
                await boots
                for actor in booted:
                    ray.kill(actor)
            after, t_end = cpu_by_pid(), time.monotonic()
            wall = t_end - t0
            proc.join(10)
            split = {k: round(100 * v / wall / n, 2) for k, v in sorted(cpu_split(before, after, live=n).items())}
            boot_pids = booted_session_pids(before, after) if before is not first else None
            whole = sum(cpu_split(first, after).values()) / (t_end - t_first)
            e2e, steady = pct(result["e2e_ms"]), pct(result["steady_e2e_ms"])
            over = pct([x - known for x in result["e2e_ms"]])
            # native: the VAD's own placing of the pause and of the end taken out, turn by turn (`_turns`)
            server = pct(result["server_ms"]) if len(result["server_ms"]) == len(result["e2e_ms"]) else None
            steady_server = pct(result["steady_server_ms"]) if server is not None else None
            row = {"sessions": n, "e2e_ms": e2e, "e2e_steady_ms": steady, "overhead_ms": over, "server_ms": server,
                   "server_steady_ms": steady_server,
                   "vad_end_after_speech_ms": pct(result["vad_end_ms"]), "connect_ms": pct(result["connect_ms"]),
                   "uplink_lag_ms": pct(result["lag_ms"]), "failures": result["failures"],
                   "refused_busy_then_retried": len(result["busy"]),
                   "server_cpu_pct_of_core_per_session": split,
                   "server_cpu_pct_of_core": round(sum(split.values()) * n, 1),
                   "server_cpu_pct_of_core_whole_run": round(100 * whole, 1),
                   "load_generator_cpu_pct_of_core": round(100 * result["cpu_s"] / result["wall_s"], 1),
                   "session_actors_started_in_steady_turns": None if boot_pids is None else len(boot_pids),
                   # for a look at which turns a boot overlapped: seconds from the steady start
                   "session_actor_boots_at_s": started_at(boot_pids, result["steady_from"])
                   if boot_pids is not None and math.isfinite(result["steady_from"]) else None,
                   "steady_turns_at_s_e2e_ms": result["steady_turns"],
                   "steady_turns_at_s_server_ms": result["steady_server_turns"],
                   "wall_s": round(wall, 1)}
            report["runs"].append(row)
            print(f"[load] {n} sessions: e2e p50 {e2e['p50']} p99 {e2e['p99']} ms; overhead p50 {over['p50']} "
                  f"p99 {over['p99']} ms; connect p50 {row['connect_ms']['p50']} p99 {row['connect_ms']['p99']} ms; "
                  f"uplink lag p99 {row['uplink_lag_ms']['p99']} ms; failures {len(result['failures'])}; refused "
                  f"busy (limit.starting_sessions) and retried {row['refused_busy_then_retried']}", flush=True)
            print(f"[load]   turns after every session's first (no actor starting): e2e p50 {steady['p50']} "
                  f"p99 {steady['p99']} ms (n={steady['n']})", flush=True)
            if server is not None:
                print(f"[load]   the VAD ended speech p50 {row['vad_end_after_speech_ms']['p50']} ms after its last "
                      f"loud sample (end_silence_ms {config.vad.end_silence_ms}); overhead without the VAD's placing "
                      f"of the pause and the end p50 {server['p50']} p99 {server['p99']} ms; in the turns after every "
                      f"session's first p50 {steady_server['p50']} p99 {steady_server['p99']} ms", flush=True)
            print(f"[load]   server CPU after every session's first turn {row['server_cpu_pct_of_core']}% of a core "
                  f"({sum(split.values()):.1f}% per session: {split}); whole run (actor starts and model loads "
                  f"included) {row['server_cpu_pct_of_core_whole_run']}%; load generator "
                  f"{row['load_generator_cpu_pct_of_core']}% of a core; session actors started (or still "
                  f"booting) in the steady turns: {row['session_actors_started_in_steady_turns']}", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", type=lambda s: [int(x) for x in s.split(",") if x], default=[1, 8, 16, 32])
    p.add_argument("--protocol", choices=["xiaozhi", "native"], default="xiaozhi")
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--stagger-s", type=float, default=2.0, help="spread the session starts over this long")
    p.add_argument("--warm", type=int, default=None, help="warm sessions (default: bench/run.py's, up to 8)")
    p.add_argument("--port", type=int, default=PORT + 40)
    p.add_argument("--gateway-port", type=int, default=0,
                   help="serve device sockets from the per-node gateway on this port (ingress.gateway_port)")
    p.add_argument("--ota", choices=["serve", "gateway"], default="serve",
                   help="where xiaozhi devices ask OTA: Serve's port, or the gateway's (with --gateway-port)")
    p.add_argument("--uplink-batch-ms", type=int, default=120, help="the ingress's uplink batch (ingress.uplink_batch_ms)")
    p.add_argument("--connects", type=int, default=0,
                   help="first time connect -> hello: this many new clients, the same resuming, then a burst "
                        "of twice the warm pool (pass --sessions '' to do only this)")
    p.add_argument("--boots-when-steady", type=int, default=0,
                   help="once every session is past its first turn, start this many session actors one after "
                        "another from the bench's own process (a refill's boots without the ingress's part; "
                        "with --warm 0 nothing else boots)")
    opts = p.parse_args(argv)
    report = asyncio.run(run(opts))
    print(f"[load] wrote {write_report(f'load-{opts.protocol}', report)}", flush=True)
    return 0


def write_report(name: str, report: dict[str, Any]) -> Path:
    """bench/results/<name>-<time>.json (git-ignored)."""
    out = Path(__file__).resolve().parent / "results" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    return out


if __name__ == "__main__":
    raise SystemExit(main())
