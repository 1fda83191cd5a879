"""The control panel's server side: what `GET /admin` (web/admin.html) shows
and does, behind the admin routes of `VoiceIngress` (serve_app.py, section
"control panel"), which check the admin role before calling anything here.

- Sessions, cluster-wide: every named session actor in the namespace (the
  `sessions:directory` actor's live places plus the actors themselves), each
  with its own `stats()`: owner, persona, state, turns, age, node. A
  session's transcript comes from its live actor, else the history store.
- Provider pools on every node (`pool_handles`); every provider of the
  failover chains as the live sessions use it (`provider_rows`: each session
  actor reports its own breakers and call counters in `stats()`, summed
  here), cloud providers and fallbacks included; this replica's circuit
  breakers (its HTTP audio routes); the warm pool (this replica's figures,
  and the unclaimed session actors cluster-wide).
- Recent errors and turn latencies: bounded buffers in this replica's
  `IngressMetrics`, fed by the events it relays (`observe`). Error codes and
  their messages only, never what a user said.
- A time series sampled every `SAMPLE_PERIOD_S` in a thread of the replica:
  live sessions (cluster-wide), this replica's sockets, and latency
  percentiles over the last `WINDOW_S`.
- The effective configuration with every secret masked (`mask_config`).
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import ray
from pydantic import BaseModel, SecretStr

from actors.config import AppConfig

log = logging.getLogger("voice_actors.admin")

SAMPLE_PERIOD_S = 5.0
"""How often the time series takes a point."""
SERIES_POINTS = 720
"""Points kept: an hour at SAMPLE_PERIOD_S."""
WINDOW_S = 60.0
"""Each point's latency percentiles are over the turns of this many seconds before it."""
CALL_TIMEOUT_S = 3.0
"""How long one actor may take to answer the panel before it is shown as unreachable."""
LATENCY_STAGES = ("first_audio", "stt_final", "llm_first_token", "tts_first_audio")
ERRORS_RETURNED = 100

# ------------------------------------------------------------------ configuration, masked
MASK = "********"
SECRET_NAME = re.compile(r"key|secret|passw|token|dsn|credential|authorization|cookie|private", re.IGNORECASE)
"""A field (or mapping key) named like this has its string values masked."""
MASK_EVERY_VALUE_UNDER = frozenset({"headers", "env"})
"""Mappings whose every string value is masked (an MCP server's HTTP headers and environment)."""
ENV_VAR_NAME = re.compile(r"[A-Z_][A-Z0-9_]{0,127}")
"""`api_key_env: DASHSCOPE_API_KEY` names a variable, it is not the key: shown."""
URL_CREDENTIALS = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)([^/@\s]+)@")


def mask_config(config: AppConfig) -> dict[str, Any]:
    """The effective configuration as JSON-ready data: every `SecretStr`, every
    string under a field named like key / secret / password / token / dsn,
    every HTTP header and environment value of an MCP server and the
    credentials in any URL replaced by `MASK`. Vendor sections of stt, llm
    and tts are shown as their providers validate them (defaults filled in)."""
    data = _mask(config, "", False)
    for kind in ("stt", "llm", "tts"):
        stage = getattr(config, kind)
        for name, raw in (getattr(stage, "model_extra", None) or {}).items():
            data[kind][name] = _mask(_vendor_section(config, kind, name, raw), name, False)
    return data


def _vendor_section(config: AppConfig, kind: str, section: str, raw: Any) -> Any:
    """A vendor section as its provider's model reads it; the raw value when
    no provider owns it (load_config refuses those, so only a hand-built config)."""
    from actors.providers import registry

    try:
        for (k, name), spec in registry.specs().items():
            if k == kind and spec.section == section:
                return registry.section(config, kind, name)
    except Exception:  # a section that does not validate: shown as written, still masked
        pass
    return raw


def _mask(value: Any, name: str, mask_all: bool) -> Any:
    secret_name = bool(SECRET_NAME.search(name)) and not (
        name.endswith("_env") and isinstance(value, str) and ENV_VAR_NAME.fullmatch(value))
    if isinstance(value, SecretStr):
        return MASK
    if isinstance(value, BaseModel):
        fields = {k: getattr(value, k) for k in type(value).model_fields}
        fields.update(value.model_extra or {})
        return {k: _mask(v, k, False) for k, v in fields.items()}
    if isinstance(value, dict):
        under = mask_all or secret_name or name.lower() in MASK_EVERY_VALUE_UNDER
        return {str(k): _mask(v, str(k), under) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_mask(v, name, mask_all or secret_name) for v in value]
    if isinstance(value, (str, bytes)):
        if (mask_all or secret_name) and value:
            return MASK
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        return URL_CREDENTIALS.sub(lambda m: f"{m.group(1)}{MASK}@", text)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if hasattr(value, "__fspath__"):
        return str(value)
    return _mask(str(value), name, mask_all)


# ------------------------------------------------------------------ latency percentiles
def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of already sorted values; None for none."""
    if not sorted_values:
        return None
    rank = max(1, min(len(sorted_values), int(-(-q * len(sorted_values) // 1))))
    return round(sorted_values[rank - 1], 1)


def latency_figures(recent: dict[str, deque[tuple[float, float]]], now: float, window_s: float) -> dict[str, Any]:
    """Per stage: p50 / p90 / p99 and the count of turns in the window before `now`."""
    out: dict[str, Any] = {}
    for stage in LATENCY_STAGES:
        values = sorted(ms for ts, ms in list(recent.get(stage, ())) if now - window_s <= ts <= now + 1.0)
        out[stage] = {"p50": percentile(values, 0.5), "p90": percentile(values, 0.9),
                      "p99": percentile(values, 0.99), "n": len(values)}
    return out


class SeriesSampler:
    """A bounded time series, one point every `period_s`, taken in a daemon
    thread (the replica's loop does not exist yet when it starts)."""

    def __init__(self, metrics: Any, live_sessions: Callable[[], int | None], sockets: Callable[[], int],
                 period_s: float = SAMPLE_PERIOD_S, keep: int = SERIES_POINTS, window_s: float = WINDOW_S) -> None:
        self._metrics = metrics
        self._live_sessions = live_sessions
        self._sockets = sockets
        self.period_s = period_s
        self.window_s = window_s
        self._points: deque[dict[str, Any]] = deque(maxlen=keep)
        self._lock = threading.Lock()
        self._stopped = threading.Event()

    def start(self) -> SeriesSampler:
        threading.Thread(target=self._run, name="admin-series", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stopped.set()

    def _run(self) -> None:
        while not self._stopped.wait(self.period_s):
            try:
                self.sample()
            except Exception:  # Ray shutting down: the thread ends with the process
                log.debug("series sample failed", exc_info=True)

    def sample(self, keep: bool = True) -> dict[str, Any]:
        now = time.time()
        try:
            live = self._live_sessions()
        except Exception:  # the directory is restarting: a gap in the plot, not an error
            live = None
        point = {"t": round(now, 3), "live_sessions": live, "sockets": self._sockets(),
                 "latency_ms": latency_figures(self._metrics.recent_latency, now, self.window_s)}
        if keep:
            with self._lock:
                self._points.append(point)
        return point

    def series(self) -> dict[str, Any]:
        """Every point kept, and last one taken now (so the panel sees a turn
        that just ended); it is kept too unless the last kept one is recent."""
        with self._lock:
            last = self._points[-1]["t"] if self._points else 0.0
        now = self.sample(keep=time.time() - last >= self.period_s / 2)
        with self._lock:
            points = list(self._points)
        if not points or points[-1] is not now:
            points.append(now)
        return {"period_s": self.period_s, "window_s": self.window_s, "stages": list(LATENCY_STAGES),
                "percentiles": ["p50", "p90", "p99"], "points": points}


# ------------------------------------------------------------------ the panel
class AdminPanel:
    """Everything the admin routes answer, for one ingress replica.

    `sessions` is the replica's `SessionManager` (directory, warm pool),
    `store` its `HistoryStore` (None without one), `metrics` its
    `IngressMetrics`, `sockets` a callable counting its open sockets."""

    def __init__(self, config: AppConfig, sessions: Any, store: Any, metrics: Any,
                 sockets: Callable[[], int]) -> None:
        self.config = config
        self.sessions = sessions
        self.store = store
        self.metrics = metrics
        self.sampler = SeriesSampler(metrics, self._live_count, sockets).start()

    # ------------------------------------------------------------ sessions
    def _live_count(self) -> int:
        return len(ray.get(self.sessions.directory.live.remote(), timeout=CALL_TIMEOUT_S))

    async def _session_ids(self) -> tuple[dict[str, str], set[str]]:
        """(the directory's live places: id → owner, the ids of every hosted session)."""
        directory = self.sessions.directory
        try:
            places, hosted = await asyncio.wait_for(
                asyncio.gather(directory.live.remote(), directory.hosts.remote()), CALL_TIMEOUT_S)
        except Exception:
            places, hosted = {}, []
        return places, set(hosted)

    async def list_sessions(self) -> dict[str, Any]:
        """Every session actor alive in the cluster, newest first. A warm one
        (unclaimed, never used) is marked `warm`; one that did not answer in
        time is `unreachable`."""
        from actors.sessions import find_session

        places, actor_ids = await self._session_ids()
        now = time.time()

        async def row(sid: str) -> dict[str, Any] | None:
            actor = await find_session(self.config, sid, self.sessions.directory)
            if actor is None:
                return None  # ended since it was listed (or a stale place the directory prunes later)
            try:
                stats = await asyncio.wait_for(actor.stats.remote(), CALL_TIMEOUT_S)
            except Exception as e:
                return {"session_id": sid, "owner": places.get(sid), "state": "unreachable",
                        "error": type(e).__name__, "live": True}
            owner = stats.get("owner") or places.get(sid)
            turns = int(stats.get("turn_id") or 0)
            created = float(stats.get("created") or now)
            return {
                "session_id": sid, "owner": owner, "owner_kind": owner.split(":", 1)[0] if owner else None,
                "persona": stats.get("persona"), "state": "closing" if stats.get("closed") else stats.get("state"),
                "turns": turns, "age_s": round(max(0.0, now - created), 1), "idle_s": stats.get("idle_s"),
                "created": created, "node_id": stats.get("node_id"), "pid": stats.get("pid"),
                "clients": stats.get("subscribers", 0), "history_messages": stats.get("history_messages", 0),
                "live": True, "warm": owner is None and turns == 0 and not stats.get("subscribers"),
                "providers": stats.get("providers") or {},
            }

        rows = [r for r in await asyncio.gather(*(row(s) for s in sorted(set(places) | actor_ids))) if r]
        rows.sort(key=lambda r: r.get("created") or 0.0, reverse=True)
        return {"sessions": rows, "count": sum(1 for r in rows if not r.get("warm")),
                "warm": sum(1 for r in rows if r.get("warm"))}

    async def transcript(self, session_id: str) -> dict[str, Any] | None:
        """A session's conversation: from its live actor, else the store;
        None when neither knows it."""
        from actors.sessions import find_session

        actor = await find_session(self.config, session_id, self.sessions.directory)
        if actor is not None:
            try:
                messages, stats = await asyncio.wait_for(
                    asyncio.gather(actor.history.remote(), actor.stats.remote()), CALL_TIMEOUT_S)
                return {"session_id": session_id, "live": True, "owner": stats.get("owner"),
                        "persona": stats.get("persona"), "messages": messages}
            except Exception:  # ended meanwhile: what the store kept
                pass
        stored = await self.store.snapshot(session_id) if self.store is not None else None
        if stored is None or not stored.known:
            return None
        return {"session_id": session_id, "live": False, "owner": stored.owner, "persona": stored.persona,
                "messages": [m.model_dump() for m in stored.messages]}

    async def end(self, session_id: str, forget: bool = False) -> dict[str, Any] | None:
        """End a live session (its sockets close as it ends); with
        `forget`, delete its stored conversation too. None: nothing to end or
        forget under this id."""
        from actors.sessions import find_session

        actor = await find_session(self.config, session_id, self.sessions.directory)
        stored = self.store is not None and await self.store.known(session_id)
        if actor is None and not (forget and stored):
            return None
        if actor is not None:
            try:
                await asyncio.wait_for(actor.close.remote(forget), 10.0)
            except ray.exceptions.RayActorError:
                pass  # it exits while answering
            except Exception:  # stuck: ended the hard way
                # close() tells listeners `session.closed` (their streams end, sockets close
                # normally), saves or forgets the conversation and frees the actor for a later
                # session; one that does not answer in time is killed instead
                log.warning("session %s did not close in time; killing it", session_id)
                ray.kill(actor.actor, no_restart=True)
            try:
                await self.sessions.directory.release.remote(session_id)
            except Exception:
                pass
        if forget and self.store is not None:
            await self.store.forget(session_id)
        return {"session_id": session_id, "ended": actor is not None, "history_deleted": forget}

    # ------------------------------------------------------------ providers
    async def pools(self, sessions: dict[str, Any] | None = None) -> dict[str, Any]:
        """Every node's pool for each pooled provider, with its figures, and
        every provider as the live sessions use it (`sessions`: a
        `list_sessions()` answer, fetched when not given)."""
        if sessions is None:
            sessions, pooled = await asyncio.gather(self.list_sessions(), self._pooled())
        else:
            pooled = await self._pooled()
        chains = self._chains()
        return {"pools": pooled, "chains": chains, "providers": provider_rows(chains, sessions["sessions"])}

    async def _pooled(self) -> list[dict[str, Any]]:
        from actors.pools import pool_handles, pooled_providers

        async def node(node_id: str, handle: Any) -> dict[str, Any]:
            try:
                stats = await asyncio.wait_for(handle.stats.remote(), CALL_TIMEOUT_S)
            except Exception as e:  # unreachable, or its model still loading
                return {"node": node_id, "ok": False, "error": type(e).__name__}
            return {"node": node_id, "ok": True, "runs_on": stats.get("node_id"), "pid": stats.get("pid"),
                    "calls": stats.get("calls", 0), "failures": stats.get("failures", 0),
                    "in_flight": stats.get("in_flight", 0), "max_concurrency": stats.get("max_concurrency"),
                    "load_s": stats.get("load_s"), "latency_ms": stats.get("latency_ms")}

        out = []
        for kind, provider in pooled_providers(self.config):
            try:
                handles = await asyncio.wait_for(asyncio.to_thread(pool_handles, kind, provider, self.config),
                                                 CALL_TIMEOUT_S)
            except Exception:
                handles = {}
            nodes = list(await asyncio.gather(*(node(n, h) for n, h in handles.items())))
            out.append({"kind": kind, "provider": provider, "ok": bool(nodes) and all(n["ok"] for n in nodes),
                        "nodes": nodes,
                        **{k: sum(n.get(k, 0) for n in nodes) for k in ("calls", "failures", "in_flight")}})
        return out

    def _chains(self) -> dict[str, list[str]]:
        c = self.config
        return {kind: [getattr(c, kind).provider, *getattr(c, kind).fallback] for kind in ("stt", "llm", "tts")}

    @staticmethod
    def breakers() -> dict[str, Any]:
        """This replica's breakers (its HTTP audio routes). Each session
        process has its own, which guard its turns: summed per provider in
        `pools()["providers"]`."""
        from actors.providers.adapters.breaker import breaker_states

        return {"scope": "this ingress replica", "breakers": breaker_states()}

    async def warm_pool(self, sessions: dict[str, Any] | None = None) -> dict[str, Any]:
        sessions = sessions or await self.list_sessions()
        ready = await asyncio.to_thread(self.sessions.warm_ready)
        return {"target": self.sessions.warm_target, "ready": ready, "unclaimed_in_cluster": sessions["warm"],
                "node_idle_cpus": self.sessions.node_cpu.idle_cpus(),
                "refill_idle_cpus": self.config.server.refill_idle_cpus}

    # ------------------------------------------------------------ errors, series, config
    def errors(self, limit: int = ERRORS_RETURNED) -> dict[str, Any]:
        recent = list(self.metrics.recent_errors)[-limit:]
        recent.reverse()  # newest first
        return {"scope": "this ingress replica", "errors": recent, "kept": self.metrics.recent_errors.maxlen}

    def series(self) -> dict[str, Any]:
        return self.sampler.series()

    def config_masked(self) -> dict[str, Any]:
        return mask_config(self.config)

    async def overview(self) -> dict[str, Any]:
        """Everything the panel's refresh needs in one call (one request
        against the caller's rate limit instead of six)."""
        sessions = await self.list_sessions()
        pools = await self.pools(sessions)
        return {"time": time.time(), "sessions": sessions, "pools": pools, "breakers": self.breakers(),
                "warm_pool": await self.warm_pool(sessions), "errors": self.errors(), "series": self.series()}


# ------------------------------------------------------------------ providers, summed over sessions
BREAKER_ORDER = {"closed": 0, "half_open": 1, "open": 2}


def provider_rows(chains: dict[str, list[str]], sessions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per provider: every link of the configured chains (`role`
    primary / fallback), then any other a live session reports. Each live
    session's own breaker and counters (`stats()["providers"]`) summed:
    `state` is the worst breaker (None: no session reported it), `open_in`
    how many sessions have it open; in flight, calls and failures add up;
    `latency_ms.mean` over every call, `p95` the worst session's."""
    rows: dict[str, dict[str, Any]] = {}

    def row(kind: str, provider: str, role: str | None) -> dict[str, Any]:
        return {"kind": kind, "provider": provider, "role": role, "state": None, "sessions": 0, "open_in": 0,
                "half_open_in": 0, "consecutive_failures": 0, "opened": 0, "last_error": None,
                "calls": 0, "in_flight": 0, "failures": 0, "latency_ms": {"mean": None, "p95": None, "n": 0}}

    for kind, names in chains.items():
        for i, name in enumerate(names):
            rows.setdefault(f"{kind}:{name}", row(kind, name, "primary" if i == 0 else "fallback"))
    total_ms: dict[str, float] = {}
    for session in sessions:
        for key, p in (session.get("providers") or {}).items():
            kind, _, name = key.partition(":")
            r = rows.setdefault(key, row(kind, name, None))
            r["sessions"] += 1
            state = p.get("state")
            if state in BREAKER_ORDER and BREAKER_ORDER[state] >= BREAKER_ORDER.get(r["state"], -1):
                r["state"] = state
                r["last_error"] = p.get("last_error") or r["last_error"]
            r["open_in"] += state == "open"
            r["half_open_in"] += state == "half_open"
            r["consecutive_failures"] = max(r["consecutive_failures"], p.get("consecutive_failures") or 0)
            for k in ("opened", "calls", "in_flight", "failures"):
                r[k] += p.get(k) or 0
            lat = p.get("latency_ms") or {}
            n = lat.get("n") or 0
            if n and lat.get("mean") is not None:
                total_ms[key] = total_ms.get(key, 0.0) + lat["mean"] * n
                r["latency_ms"]["n"] += n
            if lat.get("p95") is not None:
                r["latency_ms"]["p95"] = max(r["latency_ms"]["p95"] or 0.0, lat["p95"])
    for key, ms in total_ms.items():
        rows[key]["latency_ms"]["mean"] = round(ms / rows[key]["latency_ms"]["n"], 1)
    return list(rows.values())
