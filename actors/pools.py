"""Provider pools: one named Ray actor per configured model provider per node.

A model is loaded once per pool actor and shared by every session on that
node; the pool caps concurrent calls so a burst of sessions queues instead
of thrashing the CPU. There is one pool per (kind, provider, node), pinned
to its node and found by name, so adding nodes adds STT/TTS capacity and a
caller never pays a cross-node hop when its own node has a pool (DESIGN §3).
Sessions reach pools through `PooledSTT` / `PooledTTS`, which implement the
plain provider interfaces, so a session cannot tell a pooled local model
from an in-process one; on the pool's own node they call it over a channel
(actors/pool_channel.py), elsewhere through Ray.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from typing import Any, Literal

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.config import AppConfig
from actors.pool_channel import call_pool, channel_budget, serve_pool_channel
from actors.providers.base import STT, TTS, AudioSegment, ProviderError
from actors.session_channel import ChannelHost

log = logging.getLogger(__name__)

PoolKind = Literal["stt", "tts"]
LATENCY_WINDOW = 256
"""Calls whose durations a pool keeps for its latency percentiles."""


def pool_name(kind: PoolKind, provider: str, node_id: str) -> str:
    """The one place pool names are made: `pool:{kind}:{provider}:{node_id}`.
    The node id goes last because it is hex (no colons), whereas a plug-in
    provider name (`package.module:Class`) may hold a colon."""
    return f"pool:{kind}:{provider}:{node_id}"


def pinned_to(node_id: str, num_cpus: float) -> NodeAffinitySchedulingStrategy:
    """Where a per-node pool runs: on its node. With a CPU reservation the
    affinity is soft, so a node too small for it still gets its pool served
    elsewhere instead of waiting forever. Without one it is hard: Ray places
    a zero-resource actor anywhere despite a soft affinity (1 of 9 on their
    node in a 3-node `Cluster`; bench/cluster.py found the pools off their
    nodes), and every node fits it."""
    return NodeAffinitySchedulingStrategy(node_id, soft=num_cpus > 0)


def _this_node() -> str:
    return ray.get_runtime_context().get_node_id()


@ray.remote(max_restarts=-1)
class ProviderPool:
    """Holds one provider instance (the loaded model) and serves calls to it."""

    def __init__(self, kind: PoolKind, provider: str, config: AppConfig) -> None:
        from actors.providers import build_stt, build_tts

        started = time.perf_counter()
        self._kind = kind
        self._provider_name = provider
        self._provider: STT | TTS = build_stt(provider, config) if kind == "stt" else build_tts(provider, config)
        self._load_s = time.perf_counter() - started
        limit = (config.pools.stt if kind == "stt" else config.pools.tts).max_concurrency
        self._slots = asyncio.Semaphore(limit)
        self._limit = limit
        self._calls = 0
        self._failures = 0
        self._in_flight = 0
        self._latency_ms: deque[float] = deque(maxlen=LATENCY_WINDOW)
        """The latest calls' durations (ms), for the control panel's figures."""
        self._latency_total_ms = 0.0
        self._latency_count = 0
        self._channels = ChannelHost(lambda _grant, channel: serve_pool_channel(self, channel))
        self._max_channels = channel_budget()
        self.channel_calls = 0
        """Calls that came over a channel (the rest came through Ray)."""

    async def _call(self, coro_fn: Any, *args: Any) -> Any:
        async with self._slots:
            self._in_flight += 1
            self._calls += 1
            started = time.perf_counter()
            try:
                return await coro_fn(*args)
            except Exception:
                self._failures += 1
                raise
            finally:
                self._in_flight -= 1
                took_ms = (time.perf_counter() - started) * 1000.0
                self._latency_ms.append(took_ms)
                self._latency_total_ms += took_ms
                self._latency_count += 1

    async def open_channel(self, caller_node: str) -> tuple[str, bytes] | None:
        """A channel for a caller on this pool's node (actors/pool_channel.py):
        → (socket path, one-time secret); None for a caller elsewhere."""
        if caller_node != _this_node() or self._channels.open >= self._max_channels:
            return None  # past the budget a caller goes through Ray: the same answers, no file of its own
        return await self._channels.grant(None)

    async def transcribe(self, pcm16: bytes) -> str:
        return await self._call(self._provider.transcribe, pcm16)  # type: ignore[union-attr]

    async def synthesize(self, text: str) -> AudioSegment:
        return await self._call(self._provider.synthesize, text)  # type: ignore[union-attr]

    def stats(self) -> dict[str, Any]:
        module = __import__(type(self._provider).__module__, fromlist=["MODELS_LOADED"])
        return {
            "kind": self._kind, "provider": self._provider_name, "pid": os.getpid(),
            "models_loaded_in_process": getattr(module, "MODELS_LOADED", None),
            "load_s": round(self._load_s, 3), "calls": self._calls, "failures": self._failures,
            "in_flight": self._in_flight, "max_concurrency": self._limit,
            "channels_open": self._channels.open, "channel_calls": self.channel_calls,
            "node_id": _this_node(),  # where it really runs: soft affinity may have placed it elsewhere
            "latency_ms": self._latency_figures(),
            "decodes": dict(getattr(self._provider, "decodes", None) or {}),  # Whisper's by window
        }

    def _latency_figures(self) -> dict[str, float | int | None]:
        """Call durations in ms (queueing for a slot excluded): the mean of
        every call, and the median / p95 / last of the latest LATENCY_WINDOW."""
        recent = sorted(self._latency_ms)

        def pct(q: float) -> float | None:
            return round(recent[min(len(recent) - 1, int(q * len(recent)))], 1) if recent else None

        mean = self._latency_total_ms / self._latency_count if self._latency_count else None
        return {"mean": round(mean, 1) if mean is not None else None, "p50": pct(0.5), "p95": pct(0.95),
                "last": round(self._latency_ms[-1], 1) if self._latency_ms else None, "window": len(recent)}


def get_pool(kind: PoolKind, provider: str, config: AppConfig,
             node_id: str | None = None) -> ray.actor.ActorHandle:
    """The pool for (kind, provider) on `node_id` (default: the caller's
    node), created on first use by whoever asks (`pinned_to`)."""
    node_id = node_id or _this_node()
    pool_cfg = config.pools.stt if kind == "stt" else config.pools.tts
    return ProviderPool.options(
        name=pool_name(kind, provider, node_id), namespace=config.server.namespace, lifetime="detached",
        get_if_exists=True, num_cpus=pool_cfg.num_cpus,
        max_concurrency=max(100, pool_cfg.max_concurrency * 4),
        enable_task_events=False,  # calls every turn: no GCS record of each (actors/runtime.py)
        scheduling_strategy=pinned_to(node_id, pool_cfg.num_cpus),
    ).remote(kind, provider, config)


def pool_handles(kind: PoolKind, provider: str, config: AppConfig) -> dict[str, ray.actor.ActorHandle]:
    """Every existing pool for (kind, provider) across the cluster, by the
    node id it was made for (for /health and operators; creates nothing).
    Looks in `config.server.namespace` from any namespace, since Serve
    replicas run in their own."""
    prefix = pool_name(kind, provider, "")
    found: dict[str, ray.actor.ActorHandle] = {}
    for actor in ray.util.list_named_actors(all_namespaces=True):
        name, namespace = actor["name"], actor["namespace"]
        node_id = name[len(prefix):]
        if namespace != config.server.namespace or not name.startswith(prefix) or not node_id or ":" in node_id:
            continue  # another namespace, another pool, or a plug-in whose name extends this one
        try:
            found[node_id] = ray.get_actor(name, namespace=namespace)
        except ValueError:  # gone between listing and lookup
            pass
    return found


def pooled_providers(config: AppConfig) -> list[tuple[PoolKind, str]]:
    """The configured providers that hold a local model (cloud clients have no pool)."""
    from actors.providers import registry

    chosen: list[tuple[PoolKind, str]] = [("stt", config.stt.provider), ("tts", config.tts.provider)]
    return [(kind, name) for kind, name in chosen if registry.spec(kind, name).pooled]


def ensure_pools(config: AppConfig, timeout_s: float = 120.0, node_id: str | None = None) -> list[dict[str, Any]]:
    """Create the configured pools on `node_id` (default: the caller's node)
    and wait until their models are loaded, so the first session there does
    not pay the load."""
    handles = [get_pool(kind, name, config, node_id) for kind, name in pooled_providers(config)]
    return ray.get([h.stats.remote() for h in handles], timeout=timeout_s)


POOL_RESTART_WAIT_S = 60.0
"""How long a call whose pool died waits for it to come back before its one retry."""


async def _restarted(respawn: Any) -> Any:
    """The pool once it answers again: the same actor after Ray restarted it
    (its model reloaded), or a new one if it was killed for good."""
    deadline = time.monotonic() + POOL_RESTART_WAIT_S
    while True:
        pool = await asyncio.to_thread(respawn)
        try:
            await pool.stats.remote()
            return pool
        except ray.exceptions.RayActorError:
            if time.monotonic() >= deadline:
                return pool  # the retry will fail and say so
            await asyncio.sleep(0.2)


async def _call_pool(pool: Any, method: str, arg: Any, respawn: Any, code: str, what: str,
                     use_channel: bool) -> tuple[Any, Any]:
    """One pool call, retried once if the pool actor died under it: a crashed
    pool is restarted by Ray (`max_restarts=-1`, the model reloads) and the
    retry waits for it; a pool killed for good is made again by `respawn`
    (`get_pool`). STT and TTS calls are pure, so a retry cannot say anything
    twice. → (result, the handle that answered)."""
    for attempt in (1, 2):
        try:
            return await call_pool(pool, method, arg, use_channel), pool
        except ray.exceptions.RayActorError as e:  # the pool's process died (or restarts) during the call
            if attempt == 2 or respawn is None:
                raise ProviderError(code, f"{what} failed: the {code.split('.')[0].upper()} pool "
                                          f"died ({type(e).__name__})") from e
            log.warning("%s pool died during a call (%s); retrying once", code.split(".")[0], type(e).__name__)
            pool = await _restarted(respawn)
        except Exception as e:  # RayTaskError: the model itself failed; the session must survive
            raise ProviderError(code, f"{what} failed: {type(e).__name__}") from e
    raise AssertionError("unreachable")


class PooledSTT(STT):
    def __init__(self, handle: ray.actor.ActorHandle, respawn: Any = None, use_channel: bool = True) -> None:
        self._pool = handle
        self._respawn = respawn
        self._use_channel = use_channel

    async def transcribe(self, pcm16: bytes) -> str:
        text, self._pool = await _call_pool(self._pool, "transcribe", pcm16, self._respawn,
                                            "stt.failed", "speech recognition", self._use_channel)
        return text


class PooledTTS(TTS):
    def __init__(self, handle: ray.actor.ActorHandle, respawn: Any = None, use_channel: bool = True) -> None:
        self._pool = handle
        self._respawn = respawn
        self._use_channel = use_channel

    async def synthesize(self, text: str) -> AudioSegment:
        segment, self._pool = await _call_pool(self._pool, "synthesize", text, self._respawn,
                                               "tts.failed", "speech synthesis", self._use_channel)
        return segment


def stt_provider(name: str, config: AppConfig) -> STT:
    """A local model through the pool actor on the caller's own node; a cloud
    client opened by the caller itself (a session, an ingress replica), so
    audio takes no extra hop (DESIGN §3)."""
    from actors.providers import build_stt, registry

    if not registry.spec("stt", name).pooled:
        return build_stt(name, config)
    return PooledSTT(get_pool("stt", name, config), lambda: get_pool("stt", name, config), config.pools.channel)


def tts_provider(name: str, config: AppConfig) -> TTS:
    """As stt_provider, for speech synthesis."""
    from actors.providers import build_tts, registry

    if not registry.spec("tts", name).pooled:
        return build_tts(name, config)
    return PooledTTS(get_pool("tts", name, config), lambda: get_pool("tts", name, config), config.pools.channel)
