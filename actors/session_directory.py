"""SessionDirectory: which actor hosts which session, and the idle ones.

Shared by every replica, notebook and session actor of a namespace. Every
method is async, so all of them run on the actor's one event loop and never
beside each other in threads.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import ray

from actors.config import AppConfig
from actors.history_store import HistoryStore
from actors.session_ref import HOST_PREFIX, same_actor

PING_TIMEOUT_S = 2.0


def directory_name() -> str:
    return "sessions:directory"


def session_directory(config: AppConfig) -> ray.actor.ActorHandle:
    """The namespace's directory, started if none runs (a notebook's cluster
    may have no server). A blocking round trip to Ray's control store."""
    namespace = config.server.namespace
    return SessionDirectory.options(
        name=directory_name(), namespace=namespace, lifetime="detached", get_if_exists=True,
        enable_task_events=False,  # several calls per session: no GCS record of each (actors/runtime.py)
    ).remote(namespace, config)


@ray.remote(num_cpus=0, max_restarts=-1)
class SessionDirectory:
    """Four maps, each with one job:

    - **hosts**, session id → the actor hosting it. Session actors are reused
      (actors/session_ref.py), so an id no longer names an actor; this map
      does. An entry is checked (the actor asked what it hosts) before it is
      handed out, so a dead or moved host is never given to a caller.
    - **spares**: actors whose session ended, idle until a warm pool takes
      one (at most `server.spare_sessions`; beyond that an ended actor exits).
      One not taken within `server.spare_idle_s` is let go (it exits at its
      next `holds` check): a spare is a process (~58 MB, ~0.9 % of a core
      in Ray's own timers) and a quiet server should not keep paying for
      the last busy spell; the limit is long because every new actor costs
      the control store a little for good.
    - **aliases**, stable names (a device's id) → session ids. A device must
      get its own session back on every connection, yet it is given whichever
      warm session was free at its first. Written through to the session
      store (the `dict` is its cache), so a device still gets its own
      session after this actor restarted (Ray restarts it) or the whole
      server did, on any node when the store is PostgreSQL.
    - **live places**, session id → owner: each session costs a process
      (~80 MB) wherever it was opened, so a caller may hold `per_principal`
      of them and the cluster `per_node` × alive nodes. A session frees its
      place when it ends; places of actors that died without saying so are
      found and freed when a cap is reached.

    After a restart, hosts and spares are rebuilt from the named session
    actors still running (each is asked what it hosts); live places are
    rebuilt as sessions are admitted again.
    """

    def __init__(self, namespace: str = "", config: AppConfig | None = None) -> None:
        self._namespace = namespace
        self._store = HistoryStore.from_config(config) if config is not None else None
        self._spare_cap = config.server.spare_sessions if config is not None else 0
        self._spare_idle_s = config.server.spare_idle_s if config is not None else 0.0
        self._ids: dict[str, str] = {}
        self._hosts: dict[str, ray.actor.ActorHandle] = {}
        self._spares: list[tuple[ray.actor.ActorHandle, str | None, float]] = []
        """Idle actors kept for new sessions, with their node (None: unknown,
        after a restart of the directory; a session is started on its
        ingress's node, so that its socket's traffic stays on one node) and
        since when (monotonic)."""
        self._live: dict[str, str] = {}  # session id -> owner
        self._nodes = (0.0, 1)  # (when counted, alive nodes)
        self._recovered: asyncio.Task[None] | None = None
        self._counts = {"spares_taken": 0, "spares_turned_away": 0, "spares_expired": 0}

    # ------------------------------------------------------------ hosts
    async def _ready(self) -> None:
        if self._recovered is None:
            self._recovered = asyncio.get_running_loop().create_task(self._recover())
        await asyncio.shield(self._recovered)

    async def _recover(self) -> None:
        """Rebuild hosts and spares from the session actors alive now (after
        a restart of this actor; on a first start there are none)."""
        try:
            named = await asyncio.to_thread(ray.util.list_named_actors, True)
        except Exception:
            return
        names = [a["name"] for a in named if a.get("namespace") == self._namespace
                 and a["name"].startswith(HOST_PREFIX)]

        async def ask(name: str) -> None:
            try:
                actor = ray.get_actor(name, namespace=self._namespace)
                hosted = await asyncio.wait_for(actor.hosting.remote(), PING_TIMEOUT_S)
            except Exception:
                return
            if hosted is not None:
                self._hosts.setdefault(hosted, actor)
            elif len(self._spares) < self._spare_cap:
                self._spares.append((actor, None, time.monotonic()))

        await asyncio.gather(*(ask(n) for n in names))

    async def _hosts_it(self, session_id: str, actor: ray.actor.ActorHandle) -> bool:
        """Does `actor` still host `session_id`? One too busy to answer in
        time is taken to: replacing a slow host would leave two actors
        writing one conversation; a dead one raises at once."""
        try:
            return await asyncio.wait_for(actor.hosting.remote(), PING_TIMEOUT_S) == session_id
        except asyncio.TimeoutError:
            return True
        except Exception:  # dead (RayActorError) or unreachable
            return False

    async def locate(self, session_id: str) -> ray.actor.ActorHandle | None:
        """The live actor hosting `session_id`, checked; None if it has none."""
        await self._ready()
        actor = self._hosts.get(session_id)
        if actor is None:
            return None
        if await self._hosts_it(session_id, actor):
            return actor
        if self._hosts.get(session_id) is actor:
            del self._hosts[session_id]
        return None

    async def attach(self, session_id: str, actor: ray.actor.ActorHandle) -> ray.actor.ActorHandle:
        """`actor` now hosts `session_id`, unless a live actor already does:
        → whichever hosts it (two replicas bringing back one session agree)."""
        await self._ready()
        current = self._hosts.get(session_id)
        if current is not None and not same_actor(current, actor) and await self._hosts_it(session_id, current):
            return current
        self._hosts[session_id] = actor
        return actor

    async def hosts(self) -> list[str]:
        """Ids of the sessions hosted now (unchecked: for listings)."""
        await self._ready()
        return list(self._hosts)

    async def recycle(self, actor: ray.actor.ActorHandle, node_id: str | None = None) -> bool:
        """Keep an actor whose session ended as a spare for its node
        (`server.spare_sessions` per node); False: enough spares, exit."""
        await self._ready()
        if any(same_actor(a, actor) for a, _, _ in self._spares):
            return True
        if sum(1 for _, node, _ in self._spares if node == node_id) >= self._spare_cap:
            self._counts["spares_turned_away"] += 1
            return False
        self._spares.append((actor, node_id, time.monotonic()))
        return True

    async def take_spare(self, node_id: str | None = None) -> ray.actor.ActorHandle | None:
        """The latest spare on `node_id` (any node's when None, and any whose
        node is unknown), or None."""
        await self._ready()
        for i in range(len(self._spares) - 1, -1, -1):
            actor, node, _ = self._spares[i]
            if node_id is None or node is None or node == node_id:
                del self._spares[i]
                self._counts["spares_taken"] += 1
                return actor
        return None

    async def holds(self, actor: ray.actor.ActorHandle) -> bool:
        """Is `actor` a spare here? One this directory forgot (a restart with
        more spares than the cap), or let go after `server.spare_idle_s`
        without a session, exits (each spare asks now and then)."""
        await self._ready()
        for i, (spare, _, since) in enumerate(self._spares):
            if same_actor(spare, actor):
                if self._spare_idle_s and time.monotonic() - since > self._spare_idle_s:
                    del self._spares[i]
                    self._counts["spares_expired"] += 1
                    return False
                return True
        return False

    # ------------------------------------------------------------ aliases
    async def lookup(self, alias: str) -> str | None:
        """The session bound to `alias`: from memory, else from the store (a
        miss is not cached: another directory, or this one before a restart,
        may bind it)."""
        sid = self._ids.get(alias)
        if sid is None and self._store is not None:
            sid = await self._store.session_for(alias)
            if sid is not None:
                self._ids[alias] = sid
        return sid

    async def bind(self, alias: str, session_id: str) -> str:
        """Bind unless another replica (or an earlier life of this directory)
        was first; returns the winner. Written to the store before it is
        answered, so a binding that was answered survives a restart."""
        if alias in self._ids:
            return self._ids[alias]
        winner = session_id if self._store is None else await self._store.bind_alias(alias, session_id)
        return self._ids.setdefault(alias, winner)

    async def bind_and_admit(self, alias: str, offered: str, owner: str, per_principal: int,
                             per_node: int) -> tuple[str, ray.actor.ActorHandle | None, str | None]:
        """A device's socket in one round trip instead of three (bind, locate,
        admit: each ~3-5 ms of a connect → hello here): bind `alias` to
        `offered` unless it is bound already, count the winner as live for
        `owner`. → (the winner, its host as last known here, unchecked, or
        None; the limit code that refuses it, or None). The host is not pinged:
        the caller's claim is refused (`SessionMoved`) by an actor that no
        longer hosts the session, and the caller then opens it again."""
        winner = await self.bind(alias, offered)
        host = None if winner == offered else self._hosts.get(winner)
        return winner, host, await self.admit(winner, owner, per_principal, per_node)

    async def locate_and_admit(self, session_id: str, owner: str, per_principal: int,
                               per_node: int) -> tuple[ray.actor.ActorHandle | None, str | None]:
        """A resume by id in one round trip: → (the host as last known here,
        unchecked as in `bind_and_admit`, or None; the limit code that refuses
        the session, or None)."""
        await self._ready()
        return self._hosts.get(session_id), await self.admit(session_id, owner, per_principal, per_node)

    # ------------------------------------------------------------ live places
    async def admit(self, session_id: str, owner: str, per_principal: int, per_node: int) -> str | None:
        """Count `session_id` as live for `owner`; → None, or the limit code that refuses it."""
        if self._live.get(session_id) == owner:
            return None
        if sum(1 for o in self._live.values() if o == owner) >= per_principal:
            await self._prune(owner)
            if sum(1 for o in self._live.values() if o == owner) >= per_principal:
                return "limit.live_sessions"
        if len(self._live) >= per_node * self._alive_nodes():
            await self._prune(None)
            if len(self._live) >= per_node * self._alive_nodes():
                return "limit.cluster_sessions"
        self._live[session_id] = owner
        return None

    async def release(self, session_id: str, actor: ray.actor.ActorHandle | None = None) -> None:
        """`session_id` ended: free its place, and its host entry if `actor` held it."""
        self._live.pop(session_id, None)
        current = self._hosts.get(session_id)
        if actor is not None and current is not None and same_actor(current, actor):
            del self._hosts[session_id]

    async def live(self) -> dict[str, str]:
        return dict(self._live)

    async def _prune(self, owner: str | None) -> None:
        stale = [s for s, o in self._live.items() if owner is None or o == owner]
        alive = await asyncio.gather(*(self.locate(s) for s in stale))
        for sid, actor in zip(stale, alive):
            if actor is None:
                self._live.pop(sid, None)

    def _alive_nodes(self) -> int:
        counted_at, n = self._nodes
        if time.monotonic() - counted_at > 10:
            n = max(1, sum(1 for node in ray.nodes() if node.get("Alive")))
            self._nodes = (time.monotonic(), n)
        return n

    async def describe(self) -> dict[str, Any]:
        """Counts for /health and the benchmarks."""
        return {"hosts": len(self._hosts), "spares": len(self._spares), "live": len(self._live),
                "aliases": len(self._ids), **self._counts}
