"""Soak: `python -m bench.soak --minutes 30 --sessions 8` (issue 12, item 8).

N concurrent native clients talk to the server for a long time: spoken turns
in real time (60 ms frames of the embedded voice's speech), a few per
connection, then the client hangs up and connects again, resuming its
session by id some of the time and starting a new one otherwise (the old one
is then an orphan the server must reap). The server runs as bench/run.py
starts it (its own Ray and Serve on 127.0.0.1, the fixed-delay fake providers
of bench/fakes.py by default), so whatever grows is the server's own doing.

Every `--sample-s` seconds it records, per window: USS and RSS per Ray
process kind (Serve proxy and controller, ingress replica, session actors,
pools, raylet, GCS, ...), live session actors (named `session:*`) against
connected clients, the session directory's live places, sockets held by the
ingress, warm actors ready, what session actors hold (event subscribers,
dropped events, history length, mailbox backlog if the actor reports one),
provider pools' calls in flight, turn latency (end of speech → first audio)
p50/p99, turns and errors. After the clients leave it waits for the reaper
(`--orphan-timeout-s` plus a margin) and counts leaked actors: claimed
session actors still alive though no client is left.

`--protocol xiaozhi` makes each client a device instead: Opus over the
xiaozhi protocol, its session named by its device id (a reconnect gets it
back; the rest of the time the client comes back as a new device and leaves
its old session to the reaper), an OTA request at its first boot and at
`--ota-share` of its reconnects; with `--gateway-port` the devices reach the
node's device gateway and its session channels (docs/architecture.md), the
path a deployment's devices take. Open file descriptors per process kind and
session channels open are sampled too (a socket or channel that is never
closed shows there first).

Writes bench/results/soak-<stamp>.csv (one row a sample), .json (summary and
samples) and .png (plot). Memory growth is the mean Ray USS of the last
window (5 min, or a third of a short run) against the first, after the
warm-up. See docs/reliability.md, "Soak".
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.run import PORT, QUESTION, build_config, pct, prepare_node_environment, ray_processes

SOAK_PORT = PORT + 20
SESSION_KIND = "SessionActor"
TRANSIENT = {SESSION_KIND, "IDLE"}
"""Process kinds whose count follows the traffic, not counted in `long_lived_uss_mb`."""
SESSION_PREFIX = "session-host:"  # actors/session_ref.py HOST_PREFIX


# ------------------------------------------------------------------ what the clients saw
@dataclass
class Window:
    """Client-side figures since the last sample."""

    e2e_ms: list[float] = field(default_factory=list)
    turns: int = 0
    errors: list[str] = field(default_factory=list)
    connects: int = 0
    resumed: int = 0
    connect_ms: list[float] = field(default_factory=list)
    lags_ms: list[float] = field(default_factory=list)
    """How late each uplink frame left against its real-time schedule (p99 < 60 ms: real time held)."""


@dataclass
class Load:
    """Shared state of the load generator."""

    window: Window = field(default_factory=Window)
    connected: int = 0
    total_turns: int = 0
    total_errors: list[str] = field(default_factory=list)
    total_connects: int = 0
    total_resumed: int = 0
    stopping: bool = False

    def take_window(self) -> Window:
        w, self.window = self.window, Window()
        return w

    def error(self, what: str) -> None:
        self.window.errors.append(what)
        self.total_errors.append(what)

    def opened(self, t0: float, resumed: bool) -> None:
        """A client's socket is open (asked for at `t0`)."""
        self.connected += 1
        self.window.connects += 1
        self.total_connects += 1
        self.window.connect_ms.append((time.monotonic() - t0) * 1000)
        if resumed:
            self.window.resumed += 1
            self.total_resumed += 1


async def talk(c: Any, pcm: bytes, load: Load, opts: argparse.Namespace, rng: random.Random) -> None:
    """A few spoken turns on one open socket, then hang up (and pause before
    the next call); a failure is counted, not raised."""
    try:
        for _ in range(rng.randint(opts.min_turns, opts.max_turns)):
            if load.stopping:
                break
            turn = await c.ask_audio(pcm, timeout_s=60, lags_ms=load.window.lags_ms)
            load.window.turns += 1
            load.total_turns += 1
            for e in turn.errors:
                load.error(f"turn: {e.get('code')}")
            if turn.end_of_speech_to_first_audio_ms is None or not turn.audio:
                load.error("turn: no reply audio")
            else:
                load.window.e2e_ms.append(turn.end_of_speech_to_first_audio_ms)
            await asyncio.sleep(rng.uniform(0.3, opts.think_s))
    except Exception as e:
        load.error(f"turn: {type(e).__name__}: {e}"[:160])
    finally:
        load.connected -= 1
        try:
            await c.close()
        except Exception:
            pass
    await asyncio.sleep(rng.uniform(0.2, 1.0))  # between calls


async def client_loop(i: int, base: str, token: str, pcm: bytes, load: Load, opts: argparse.Namespace,
                      rng: random.Random) -> None:
    """One user: connect (resume or new), a few spoken turns, hang up, repeat
    until the soak ends; a failure is counted and the user tries again."""
    from actors.client import NativeClient

    await asyncio.sleep(i * opts.stagger_s)
    sid: str | None = None
    while not load.stopping:
        resume = sid is not None and rng.random() < opts.resume_share
        t0 = time.monotonic()
        try:
            c = await NativeClient.connect(f"{base}/ws/voice", token, session_id=sid if resume else None)
        except Exception as e:
            load.error(f"connect: {type(e).__name__}: {e}"[:160])
            await asyncio.sleep(2.0)
            continue
        load.opened(t0, resume)
        if resume:
            if c.session_id != sid or c.hello.get("resumed") is not True:
                load.error(f"resume gave {c.session_id} resumed={c.hello.get('resumed')} for {sid}")
        sid = c.session_id
        await talk(c, pcm, load, opts, rng)


async def device_loop(i: int, base: str, pcm: bytes, load: Load, opts: argparse.Namespace,
                      rng: random.Random) -> None:
    """One xiaozhi device: OTA at boot, connect, a few spoken turns, hang up,
    repeat; at `1 - resume_share` of its reconnects it comes back as a new
    device (a new id: its old session is left to the reaper)."""
    from actors.client import XiaozhiClient
    from bench.load import _ota_websocket

    await asyncio.sleep(i * opts.stagger_s)
    generation, sid, ota = 0, None, None
    while not load.stopping:
        resume = sid is not None and rng.random() < opts.resume_share
        if sid is not None and not resume:
            generation, sid, ota = generation + 1, None, None
        device = f"02:00:00:05:{i:02x}:{generation % 256:02x}"
        t0 = time.monotonic()
        try:
            if ota is None or rng.random() < opts.ota_share:  # a boot
                ota = await _ota_websocket(base, device)
            c = await XiaozhiClient.connect(ota["url"], ota["token"], device, client_id=device)
        except Exception as e:
            load.error(f"connect: {type(e).__name__}: {e}"[:160])
            ota = None
            await asyncio.sleep(2.0)
            continue
        load.opened(t0, resume)
        if resume:
            if c.session_id != sid:
                load.error(f"device {device} got session {c.session_id}, had {sid}")
        sid = c.session_id
        await talk(c, pcm, load, opts, rng)


# ------------------------------------------------------------------ what the server holds
def process_kind(p: Any) -> str:
    """`ray::ServeReplica:voice-actors:VoiceIngress` → that; raylet, gcs_server, ... by name."""
    argv = p.cmdline()
    cmd = " ".join(argv)
    if "ray::" in cmd:  # `ray::Actor.method` while a call runs: the process is still that actor
        return cmd.split("ray::", 1)[1].split()[0].split(".")[0]
    scripts = [Path(a).stem for a in argv[1:] if a.endswith(".py")]
    return scripts[0] if scripts else (p.name() or "other")


def memory_by_kind() -> dict[str, dict[str, float]]:
    """USS and RSS (MB), open file descriptors and process count per kind, over this run's Ray processes."""
    out: dict[str, dict[str, float]] = {}
    for p in ray_processes():
        try:
            kind = process_kind(p)
            info = p.memory_full_info()
        except Exception:  # exited between listing and reading
            continue
        try:
            fds = p.num_fds()
        except Exception:
            fds = 0
        k = out.setdefault(kind, {"uss_mb": 0.0, "rss_mb": 0.0, "procs": 0, "fds": 0})
        k["fds"] += fds
        k["uss_mb"] += info.uss / 2 ** 20
        k["rss_mb"] += info.rss / 2 ** 20
        k["procs"] += 1
    return out


def actor_table() -> dict[str, int | None]:
    """Ray's own count from the GCS actor table (named or not): alive actors,
    alive SessionActors, and dead actors the GCS still keeps. The public state
    API (`ray.util.state.list_actors`) needs the dashboard, which the bench
    does not start, so this reads the table the way `ray.state.actors()` did."""
    try:
        import ray._private.state as state

        actors = state.actors().values()
    except Exception:  # a private API: gone in some Ray version
        return {"actors_alive": None, "session_actors_alive_in_gcs": None, "actors_dead_in_gcs": None}
    alive = [a for a in actors if a.get("State") == "ALIVE"]
    return {"actors_alive": len(alive),
            "session_actors_alive_in_gcs": sum(1 for a in alive if a.get("ActorClassName") == SESSION_KIND),
            "actors_dead_in_gcs": sum(1 for a in actors if a.get("State") == "DEAD")}


async def census(namespace: str) -> dict[str, Any]:
    """Session actors alive (hosting a session, or spares) and what they
    hold; the directory's live places."""
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == namespace and a["name"].startswith(SESSION_PREFIX)]

    async def stats_of(name: str) -> dict[str, Any] | None:
        try:
            actor = ray.get_actor(name, namespace=namespace)
            sid = await asyncio.wait_for(actor.hosting.remote(), 5.0)
            if sid is None:
                return {"spare": True}
            return await asyncio.wait_for(actor.stats.remote(session_id=sid), 5.0)
        except Exception:  # ended between listing and asking
            return None

    answers = [s for s in await asyncio.gather(*(stats_of(n) for n in names)) if s is not None]
    spares = sum(1 for s in answers if s.get("spare"))
    stats = [s for s in answers if not s.get("spare")]
    try:
        directory = ray.get_actor("sessions:directory", namespace=namespace)
        live = len(await asyncio.wait_for(directory.live.remote(), 5.0))
    except Exception:
        live = -1
    table = actor_table()
    backlogs = [s.get("mailbox_backlog") for s in stats]
    backlogs = [sum(b.values()) if isinstance(b, dict) else b for b in backlogs if b is not None]
    return {
        "session_actors": len(names),
        "spares": spares,
        "sessions_claimed": sum(1 for s in stats if s.get("owner")),
        "sessions_unclaimed": sum(1 for s in stats if not s.get("owner")),
        "claimed_ids": sorted(s["session_id"] for s in stats if s.get("owner")),
        "directory_live": live,
        **table,
        "subscribers": sum(s.get("subscribers", 0) for s in stats),
        "channels_open": sum(s.get("channels_open", 0) for s in stats),
        "dropped_events": sum(s.get("dropped_events", 0) for s in stats),
        "max_history_messages": max((s.get("history_messages", 0) for s in stats), default=0),
        "max_mailbox_backlog": max(backlogs) if backlogs else None,
    }


async def health(http_base: str) -> dict[str, Any]:
    import httpx

    try:
        async with httpx.AsyncClient(timeout=10) as http:
            h = (await http.get(f"{http_base}/health")).json()
    except Exception as e:
        return {"health_error": type(e).__name__}
    in_flight = sum(c.get("in_flight", 0) for k, c in h.get("checks", {}).items() if k.startswith("pool:"))
    gateway = h.get("checks", {}).get("device_gateway", {})
    # each ingress process (the replica, and the gateway when it is on) keeps a warm pool of its own
    return {"sockets": h.get("sockets"), "warm_ready": h.get("warm_sessions_ready"),
            "warm_target": (h.get("warm_sessions_target") or 0) + gateway.get("warm_sessions_target", 0),
            "gateway_sockets": gateway.get("sockets"), "pool_in_flight": in_flight, "status": h.get("status")}


async def sample(t0: float, phase: str, load: Load, namespace: str, http_base: str) -> dict[str, Any]:
    w = load.take_window()
    mem = await asyncio.to_thread(memory_by_kind)
    lat = pct(w.e2e_ms)
    row: dict[str, Any] = {
        "t_s": round(time.monotonic() - t0, 1), "phase": phase, "clients_connected": load.connected,
        "turns": w.turns, "errors": len(w.errors), "connects": w.connects, "resumed": w.resumed,
        "e2e_p50_ms": lat["p50"], "e2e_p99_ms": lat["p99"], "connect_p50_ms": pct(w.connect_ms)["p50"],
        **{k: v for k, v in (await census(namespace)).items() if k != "claimed_ids"},
        **(await health(http_base)),
        "ray_uss_mb": round(sum(k["uss_mb"] for k in mem.values()), 1),
        "ray_rss_mb": round(sum(k["rss_mb"] for k in mem.values()), 1),
        "ray_procs": sum(int(k["procs"]) for k in mem.values()),
        # what should not grow with the number of sessions alive: every process but session actors
        # and idle workers (both come and go with the traffic)
        "long_lived_uss_mb": round(sum(k["uss_mb"] for kind, k in mem.items() if kind not in TRANSIENT), 1),
        "uplink_lag_p99_ms": pct(w.lags_ms)["p99"],
    }
    for kind, k in mem.items():
        row[f"uss_mb:{kind}"] = round(k["uss_mb"], 1)
        row[f"rss_mb:{kind}"] = round(k["rss_mb"], 1)
        row[f"procs:{kind}"] = int(k["procs"])
        row[f"fds:{kind}"] = int(k["fds"])
    row["error_kinds"] = sorted(set(w.errors))[:5]
    print(f"[soak] t={row['t_s']:>6}s {phase:<7} clients {row['clients_connected']:>2} "
          f"sessions {row['session_actors']:>2} (claimed {row['sessions_claimed']}, spare {row['spares']}, directory {row['directory_live']}) "
          f"turns {w.turns:>3} errors {len(w.errors)} p50 {lat['p50']} p99 {lat['p99']} ms "
          f"Ray USS {row['ray_uss_mb']:.0f} MB in {row['ray_procs']} procs", flush=True)
    return row


# ------------------------------------------------------------------ summary, files


def summarize(rows: list[dict[str, Any]], load: Load, leak: dict[str, Any], opts: argparse.Namespace,
              n_sessions: int) -> dict[str, Any]:
    """Memory growth (last window vs first, after the warm-up), leaks, errors, latency."""
    run = [r for r in rows if r["phase"] == "run"]
    if not run:
        return {"error": "no samples"}
    span = run[-1]["t_s"] - run[0]["t_s"]
    window_s = min(300.0, max(span / 3, opts.sample_s))
    first = [r for r in run if r["t_s"] <= run[0]["t_s"] + window_s]
    last = [r for r in run if r["t_s"] >= run[-1]["t_s"] - window_s]

    def mean(rs: list[dict[str, Any]], key: str) -> float | None:
        vals = [r[key] for r in rs if r.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    def growth(key: str) -> dict[str, Any]:
        a, b = mean(first, key), mean(last, key)
        return {"first_mb": None if a is None else round(a, 1), "last_mb": None if b is None else round(b, 1),
                "growth_pct": None if not a or b is None else round(100 * (b - a) / a, 2)}

    kinds = sorted({k.split(":", 1)[1] for r in run for k in r if k.startswith("uss_mb:")})
    # long-lived processes: a count that does not change through the run (session actors come and go)
    per_kind = {k: growth(f"uss_mb:{k}") for k in kinds}
    per_session = {}
    for label, rs in (("first", first), ("last", last)):
        vals = [r[f"uss_mb:{SESSION_KIND}"] / r[f"procs:{SESSION_KIND}"] for r in rs
                if r.get(f"procs:{SESSION_KIND}")]
        per_session[label] = round(sum(vals) / len(vals), 1) if vals else None
    all_e2e = [x for r in run for x in ([r["e2e_p50_ms"]] if r["e2e_p50_ms"] is not None else [])]
    err_kinds: dict[str, int] = {}
    for e in load.total_errors:
        err_kinds[e[:60]] = err_kinds.get(e[:60], 0) + 1
    return {
        "sessions": n_sessions, "minutes": opts.minutes, "samples": len(run),
        "memory_window_s": round(window_s), "ray_uss": growth("ray_uss_mb"), "ray_rss": growth("ray_rss_mb"),
        "long_lived_uss": growth("long_lived_uss_mb"),
        "uss_by_kind": per_kind, "session_actor_uss_mb_each": per_session,
        "turns": load.total_turns, "connects": load.total_connects, "resumed_connects": load.total_resumed,
        "errors": len(load.total_errors), "error_kinds": err_kinds,
        "e2e_window_p50_ms": {"first": all_e2e[0] if all_e2e else None, "last": all_e2e[-1] if all_e2e else None,
                              "median_of_windows": sorted(all_e2e)[len(all_e2e) // 2] if all_e2e else None},
        "e2e_window_p99_ms_max": max((r["e2e_p99_ms"] for r in run if r["e2e_p99_ms"] is not None), default=None),
        "uplink_lag_window_p99_ms_max": max((r["uplink_lag_p99_ms"] for r in run
                                             if r["uplink_lag_p99_ms"] is not None), default=None),
        "fds_by_kind": {k: {"first": mean(first, f"fds:{k}"), "last": mean(last, f"fds:{k}")}
                        for k in kinds if k not in TRANSIENT},
        "max_channels_open": max((r.get("channels_open") or 0) for r in run),
        "max_dropped_events": max(r["dropped_events"] for r in run),
        "max_pool_in_flight": max((r.get("pool_in_flight") or 0) for r in run),
        "max_session_actors": max(r["session_actors"] for r in run),
        "max_directory_live": max(r["directory_live"] for r in run),
        "actors_alive": {"first": run[0].get("actors_alive"), "last": run[-1].get("actors_alive"),
                         "after_reap": rows[-1].get("actors_alive")},
        "actors_dead_in_gcs_last": rows[-1].get("actors_dead_in_gcs"),
        "leaks": leak,
    }


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: (";".join(v) if isinstance(v, list) else v) for k, v in r.items()})


def plot(rows: list[dict[str, Any]], summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r["t_s"] / 60 for r in rows]
    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(10, 10), sharex=True)
    kinds = sorted({k.split(":", 1)[1] for r in rows for k in r if k.startswith("uss_mb:")},
                   key=lambda k: -max(r.get(f"uss_mb:{k}", 0) for r in rows))
    for k in kinds[:8]:
        ax1.plot(t, [r.get(f"uss_mb:{k}") for r in rows], label=k[:40])
    ax1.plot(t, [r["ray_uss_mb"] for r in rows], "k-", lw=2, label="all Ray processes")
    ax1.plot(t, [r["long_lived_uss_mb"] for r in rows], "k--", lw=1.5, label="all but sessions and idle workers")
    ax1.set(ylabel="USS (MB)", title=f"soak: {summary.get('sessions')} clients; USS growth: all Ray "
                                     f"{summary.get('ray_uss', {}).get('growth_pct')} %, long-lived "
                                     f"{summary.get('long_lived_uss', {}).get('growth_pct')} %")
    ax1.legend(fontsize=7, ncol=2)
    ax2.plot(t, [r["clients_connected"] for r in rows], label="clients connected")
    ax2.plot(t, [r["session_actors"] for r in rows], label="session actors alive")
    ax2.plot(t, [r["sessions_claimed"] for r in rows], label="claimed session actors")
    ax2.plot(t, [r["directory_live"] for r in rows], "--", label="directory live places")
    ax2.plot(t, [r.get("sockets") for r in rows], ":", label="ingress sockets")
    ax2.set(ylabel="count")
    ax2.legend(fontsize=7)
    ax3.plot(t, [r["e2e_p50_ms"] for r in rows], "-o", ms=3, label="end of speech → first audio p50")
    ax3.plot(t, [r["e2e_p99_ms"] for r in rows], "-^", ms=3, label="p99")
    ax3b = ax3.twinx()
    ax3b.bar(t, [r["errors"] for r in rows], width=0.1, color="red", alpha=0.4, label="errors")
    ax3b.set_ylabel("errors per window")
    ax3b.set_ylim(bottom=0, top=max([1, *(r["errors"] for r in rows)]))
    ax3.set(xlabel="minutes", ylabel="ms")
    ax3.legend(fontsize=7, loc="upper left")
    for ax in (ax1, ax2, ax3):
        ax.axvspan(max((r["t_s"] for r in rows if r["phase"] == "run"), default=0) / 60, t[-1] if t else 0,
                   color="grey", alpha=0.1)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# ------------------------------------------------------------------ the server under test
def server_config(mode: str, sessions: int, namespace: str, orphan_timeout_s: float,
                  uplink_batch_ms: int = 120, gateway_port: int = 0) -> Any:
    """bench/run.py's config in a namespace of its own, with its stores in a
    temporary directory (not the project's data/: a soak writes thousands of
    turns) and the orphan timeout given."""
    bench_opts = argparse.Namespace(mode=mode, sessions=[sessions], uplink_batch_ms=uplink_batch_ms,
                                    no_preemptive=False, no_decode_at_pause=False, fakes=None, gateway_port=gateway_port)
    config = build_config(bench_opts)
    store = Path(tempfile.mkdtemp(prefix=f"{namespace}-"))
    return config.model_copy(update={
        "server": config.server.model_copy(update={"namespace": namespace}),
        "session": config.session.model_copy(update={"orphan_timeout_s": orphan_timeout_s,
                                                     "history_db": str(store / "history.sqlite3")}),
        "memory": config.memory.model_copy(update={"url": f"sqlite:///{store / 'memory.sqlite3'}"})})


def start_ray(namespace: str) -> None:
    """A Ray of this process's own, with the server's settings (actors/runtime.py)."""
    import ray

    from actors.runtime import RAY_SYSTEM_CONFIG

    prepare_node_environment()
    ray.init(address="local", include_dashboard=False, namespace=namespace, log_to_driver=False,
             _system_config=RAY_SYSTEM_CONFIG)


# ------------------------------------------------------------------ orchestration
async def soak(opts: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    import ray
    from ray import serve

    from actors.audio import silence
    from actors.ingress.auth import Authenticator
    from actors.pools import ensure_pools
    from bench.run import speech_fixture
    from serve_app import build_app

    config = server_config(opts.mode, opts.sessions, "voice-actors-soak", opts.orphan_timeout_s,
                           gateway_port=opts.gateway_port)
    namespace = config.server.namespace
    started = time.monotonic()
    print(f"[soak] starting Ray and Serve ({opts.mode} providers) on 127.0.0.1:{opts.port}...", flush=True)
    start_ray(namespace)
    try:
        ensure_pools(config)
        serve.start(http_options={"host": "127.0.0.1", "port": opts.port})
        serve.run(build_app(config), name="voice-actors", route_prefix="/")
        base, http_base = f"ws://127.0.0.1:{opts.port}", f"http://127.0.0.1:{opts.port}"
        token = Authenticator(config.auth).issue_token("soak")
        pcm = silence(500) + speech_fixture(QUESTION)
        print(f"[soak] up in {time.monotonic() - started:.1f} s; {opts.sessions} clients for {opts.minutes} min, "
              f"sample every {opts.sample_s:.0f} s, orphans reaped after {opts.orphan_timeout_s:.0f} s", flush=True)

        load = Load()
        rng = random.Random(opts.seed)
        rows: list[dict[str, Any]] = []
        t0 = time.monotonic()
        # with the gateway on, sockets go to it, and devices boot with its OTA URL
        sockets = f"ws://127.0.0.1:{opts.gateway_port}" if opts.gateway_port else base
        if opts.protocol == "xiaozhi":
            clients = [asyncio.create_task(device_loop(i, sockets, pcm, load, opts, random.Random(rng.random())))
                       for i in range(opts.sessions)]
        else:
            clients = [asyncio.create_task(client_loop(i, sockets, token, pcm, load, opts, random.Random(rng.random())))
                       for i in range(opts.sessions)]
        end = t0 + opts.minutes * 60
        await asyncio.sleep(min(opts.warmup_s, max(0.0, end - time.monotonic())))
        load.take_window()  # the warm-up's turns (first use of each provider) are not a window
        rows.append(await sample(t0, "run", load, namespace, http_base))
        while time.monotonic() < end:
            await asyncio.sleep(max(0.0, min(opts.sample_s, end - time.monotonic())))
            rows.append(await sample(t0, "run", load, namespace, http_base))
            write_csv(rows, opts.csv_path)  # a long run leaves its figures even if it is stopped
        load.stopping = True
        print("[soak] clients finishing their turn and leaving...", flush=True)
        await asyncio.wait(clients, timeout=90)
        for c in clients:
            c.cancel()
        # every session now has no client: the reaper ends each after orphan_timeout_s (+ its period)
        reap_by = time.monotonic() + opts.orphan_timeout_s + opts.reap_margin_s
        while time.monotonic() < reap_by:
            await asyncio.sleep(max(0.0, min(opts.sample_s, reap_by - time.monotonic())))
            rows.append(await sample(t0, "reap", load, namespace, http_base))
        final = await census(namespace)
        warm = (await health(http_base)).get("warm_target", config.server.warm_sessions)
        leak = {"claimed_session_actors_alive": final["sessions_claimed"], "claimed_ids": final["claimed_ids"],
                "unclaimed_alive": final["sessions_unclaimed"], "warm_target": warm,
                "directory_live": final["directory_live"], "clients_connected": load.connected,
                "session_actor_processes": memory_by_kind().get(SESSION_KIND, {}).get("procs", 0),
                "session_actors_alive_in_gcs": final["session_actors_alive_in_gcs"],
                "actors_alive": final["actors_alive"]}
        spares = min(final["spares"], config.server.spare_sessions)
        leak["spares"] = final["spares"]
        leak["spare_cap"] = config.server.spare_sessions
        leak["leaked_actors"] = max(final["sessions_claimed"] + max(0, final["sessions_unclaimed"] - warm)
                                    + final["spares"] - spares,
                                    (final["session_actors_alive_in_gcs"] or 0) - warm - spares)  # unnamed ones too
        summary = summarize(rows, load, leak, opts, opts.sessions)
        return rows, summary
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=30.0, help="how long the clients talk (0.2 for a smoke run)")
    p.add_argument("--sessions", type=int, default=8,
                   help="concurrent clients (8: the native ceiling of docs/benchmarks.md, fake providers)")
    p.add_argument("--mode", choices=("fake", "real"), default="fake",
                   help="fake: fixed-delay providers (bench/fakes.py); real: the embedded models")
    p.add_argument("--sample-s", type=float, default=30.0, help="seconds between samples")
    p.add_argument("--warmup-s", type=float, default=20.0, help="not counted in the first memory window")
    p.add_argument("--min-turns", type=int, default=2, help="spoken turns per connection, at least")
    p.add_argument("--max-turns", type=int, default=4, help="spoken turns per connection, at most")
    p.add_argument("--protocol", choices=("native", "xiaozhi"), default="native",
                   help="native PCM clients, or xiaozhi devices (Opus, sessions by device id, OTA)")
    p.add_argument("--gateway-port", type=int, default=0,
                   help="run the device gateway on this port: the clients' sockets go to it, devices ask its OTA")
    p.add_argument("--ota-share", type=float, default=0.25,
                   help="xiaozhi: share of a device's reconnects that begin with an OTA request (a reboot)")
    p.add_argument("--resume-share", type=float, default=0.5,
                   help="share of reconnects that resume the session (by id; xiaozhi: the same device), "
                        "the rest start a new one")
    p.add_argument("--think-s", type=float, default=2.0, help="pause after a turn, at most (uniform from 0.3)")
    p.add_argument("--stagger-s", type=float, default=0.5, help="between the clients' first connects")
    p.add_argument("--orphan-timeout-s", type=float, default=30.0,
                   help="session.orphan_timeout_s for this run: how soon a session left by its client ends")
    p.add_argument("--reap-margin-s", type=float, default=30.0, help="waited beyond the orphan timeout at the end")
    p.add_argument("--seed", type=int, default=20261129)
    p.add_argument("--port", type=int, default=SOAK_PORT)
    p.add_argument("--out", default="bench/results")
    opts = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    opts.csv_path = out / f"soak-{stamp}.csv"
    rows, summary = asyncio.run(soak(opts))
    summary["command"] = " ".join(["python -m bench.soak", *sys.argv[1:]] if argv is None
                                  else ["python -m bench.soak", *argv])
    summary["when"] = time.strftime("%Y-%m-%d %H:%M:%S")
    json_path, png_path = out / f"soak-{stamp}.json", out / f"soak-{stamp}.png"
    write_csv(rows, opts.csv_path)
    json_path.write_text(json.dumps({"summary": summary, "samples": rows}, indent=2))
    plot(rows, summary, png_path)
    print(json.dumps({k: v for k, v in summary.items() if k != "uss_by_kind"}, indent=2))
    print(f"[soak] wrote {opts.csv_path}, {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
