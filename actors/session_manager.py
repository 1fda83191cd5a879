"""The ingress's warm pool and the sessions it is starting.

A cold Ray actor takes ~0.4 s to start (DESIGN §2), so `SessionManager`
keeps `server.warm_sessions` idle session actors started ahead, each already
hosting the id it will be handed out under; it takes the directory's spares
(actors whose session ended) before it starts new ones, and hands a socket
whose session needs a new actor a `StartingSession`, so its hello does not
wait for the actor.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable

import ray

from actors.config import AppConfig
from actors.ingress.limits import LimitError
from actors.node_cpu import NodeCpu
from actors.session_directory import session_directory
from actors.session_ref import SessionRef, StartingSession
from actors.sessions import find_session, idle_session_actor, new_session_id, open_session

STARTS_AT_ONCE = 1
COLD_STARTS_AT_ONCE = 2
"""Sessions that need a new actor (a burst beyond the warm pool) start at
most this many at a time: each new Ray worker boots on ~1 s of CPU, and
eight at once on two cores slowed every hello and live session for seconds,
while started in turn the first of them are ready sooner. The warm pool's
refill waits while any of them waits (`refill`)."""
COLD_START_CPU_S = 1.0
"""About what one new session actor's start costs the node (its worker's
boot and imports, the raylet's and the GCS's share): the retry hint's unit."""
HELLOS_FIRST_MAX_S = 0.3
"""A new actor's start waits at most this long for the hellos in flight on
this ingress (`hello_in_flight`): a Ray worker boots on ~1 s of CPU, and
in a burst of connects two boots took both cores while the hellos waited
(bench.load `--connects`). Its own session's first turn is ~1 s away anyway."""
REFILL_PERIOD_S = 0.5
KEEPALIVE_SHARE = 0.25
"""Warm actors are touched every idle_timeout_s × this, so they never reap
themselves while their pool holds them (else the pool would hand out dead
actors after a quiet spell)."""


class PendingHellos:
    """Hellos being answered on one ingress. Called when a client's hello
    arrives → the call that says the answer went out (or the socket ended
    first; calling it again does nothing). Counted from the client's
    hello, not the socket's accept: a socket that never says hello must not
    hold the warm pool back. `all_out` runs when the count falls to zero."""

    def __init__(self, all_out: Callable[[], None] = lambda: None) -> None:
        self.count = 0
        self._all_out = all_out

    def __call__(self) -> Callable[[], None]:
        self.count += 1
        pending = True

        def sent() -> None:
            nonlocal pending
            if pending:
                pending = False
                self.count -= 1
                if not self.count:
                    self._all_out()

        return sent


class SessionManager:
    """Hands out session actors, from the warm pool when it has one."""

    def __init__(self, config: AppConfig, warm: int | None = None, node_cpu: NodeCpu | None = None) -> None:
        self.config = config
        self._target = config.server.warm_sessions if warm is None else warm
        self._warm: deque[tuple[SessionRef, ray.ObjectRef]] = deque()
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._refills: set[asyncio.Future[None]] = set()
        self._starting: dict[str, StartingSession] = {}
        """Sessions this ingress is starting on new actors, by id, until their
        socket has subscribed (`StartingSession`); used on the event loop only."""
        self._cold_starts = asyncio.Semaphore(COLD_STARTS_AT_ONCE)
        self._cold_waiting = 0
        """Sessions waiting for, or in, a start on a new actor (`_start`); read by `refill`'s thread."""
        self._offered = 0
        """Warm sessions offered to a device while the directory decides (`open_alias`):
        still the pool's for `refill`, which would otherwise start one to replace
        each, then close it again when the offer came back unused."""
        self.hello_in_flight = PendingHellos(self._after_hellos)
        """Hellos being answered here (a socket calls it when its client's hello
        arrives); new actors wait for them (`_start`, `refill`, whose thread reads its count)."""
        self.node_cpu = node_cpu or NodeCpu()
        """Sampled by the pool's thread; the refill waits for an idle core (`refill`)."""
        self._directory = session_directory(config)  # started now: a device's first connect won't wait
        threading.Thread(target=self._keep_warm, name="warm-pool", daemon=True).start()
        self.refill()

    def refill(self) -> None:
        """Start warm actors up to the target, at most `STARTS_AT_ONCE` at a
        time: starting a Ray worker costs ~1 s of CPU, and a burst of them
        starved the live sessions on the same cores (bench: p50 end of speech
        → first audio 1.5 s → 2.4 s at 8 sessions). None while a session
        waits for its own actor, or a socket for its hello: a client that is
        here comes first. None either unless the node had
        `server.refill_idle_cpus` idle in each second of the last five (its
        own boots not counted): a boot on a node busy with live sessions
        made their turns wait."""
        if self._cold_waiting or self.hello_in_flight.count:
            return
        with self._lock:
            starting = [ready for _, ready in self._warm]
            done = ray.wait(starting, num_returns=len(starting), timeout=0)[0] if starting else []
            in_flight = len(starting) - len(done)
            self.node_cpu.own_work(in_flight > 0)  # the pool's own boots are not load to wait for
            if len(self._warm) + self._offered >= self._target or in_flight >= STARTS_AT_ONCE:
                return
            if not self.node_cpu.has_room(self.config.server.refill_idle_cpus):
                return
            self.node_cpu.own_work(True)
            while len(self._warm) + self._offered < self._target and in_flight < STARTS_AT_ONCE:
                actor = idle_session_actor(self.config, self._directory)
                sid = new_session_id()
                self._warm.append((SessionRef(actor, sid), actor.host.remote(sid, self.config)))
                in_flight += 1

    def _keep_warm(self) -> None:
        keepalive_every = self.config.session.idle_timeout_s * KEEPALIVE_SHARE
        touched = time.monotonic()
        self.node_cpu.sample()
        while not self._stopped.wait(min(REFILL_PERIOD_S, keepalive_every)):
            try:
                self.node_cpu.sample()
                self.refill()
                if time.monotonic() - touched >= keepalive_every:
                    touched = time.monotonic()
                    with self._lock:
                        for ref, _ in self._warm:
                            ref.touch.remote()
            except Exception:  # Ray shutting down: the thread ends with the process
                return

    @property
    def directory(self) -> ray.actor.ActorHandle:
        return self._directory

    @property
    def warm_target(self) -> int:
        return self._target

    def warm_ready(self) -> int:
        """Warm actors started and idle now (for /health and the benchmark)."""
        with self._lock:
            refs = [ready for _, ready in self._warm]
        return len(ray.wait(refs, num_returns=len(refs), timeout=0)[0]) if refs else 0

    def _take_warm(self) -> SessionRef | None:
        entry = self._take_warm_entry()
        return None if entry is None else entry[0]

    def _put_back_warm(self, entry: tuple[SessionRef, ray.ObjectRef]) -> None:
        """A warm session offered but not used goes back first in line (or to
        the spares, if the pool refilled meanwhile)."""
        with self._lock:
            self._offered -= 1
            if len(self._warm) < self._target:
                self._warm.appendleft(entry)
                return
        entry[0].close.remote()

    def _take_warm_entry(self, offer: bool = False) -> tuple[SessionRef, ray.ObjectRef] | None:
        """A started warm session, taken from the pool; `offer`: only offered
        (`_offered`), until `_put_back_warm` or `_keep_offered`."""
        with self._lock:
            for _ in range(len(self._warm)):
                ref, ready = self._warm.popleft()
                if not ray.wait([ready], timeout=0)[0]:
                    self._warm.append((ref, ready))  # still starting: keep it for later
                    continue
                try:
                    ray.get(ready, timeout=0)
                except Exception:  # a spare that exited before it was taken: drop it
                    continue
                self._offered += offer
                return ref, ready
        return None

    def _keep_offered(self) -> None:
        """An offered warm session was taken for good: the pool may replace it."""
        with self._lock:
            self._offered -= 1

    async def open(self, session_id: str | None = None) -> SessionRef:
        """Resume `session_id` (live, or brought back from the store), else a
        new session: a warm one if one is ready; → once it is started."""
        ref = await self.open_soon(session_id)
        return await ref if isinstance(ref, StartingSession) else ref

    async def open_soon(self, session_id: str | None = None) -> SessionRef | StartingSession:
        """`open`, for a socket: a session that needs a new actor comes back
        as a `StartingSession` (its id known, its actor still starting) for
        the caller to await after it said hello."""
        if session_id:
            return await self._live_or_starting(session_id)
        ref = await asyncio.to_thread(self._take_warm)
        if ref is None:  # the pool's own thread refills it
            return self._new_actor(new_session_id())
        self._refill_soon()
        return ref

    async def resume_admitted(self, session_id: str, owner: str, per_principal: int,
                              per_node: int) -> tuple[SessionRef | StartingSession, str | None]:
        """`open_soon(session_id)` and the directory's `admit` in one
        directory call when the session is live: → (session, the limit code
        that refuses it or None). The host is the directory's last known one,
        unchecked: the caller's claim is refused by an actor that moved on."""
        if session_id in self._starting:  # started here a moment ago: `_live_or_starting` waits for it
            refused = await self._directory.admit.remote(session_id, owner, per_principal, per_node)
        else:
            host, refused = await self._directory.locate_and_admit.remote(session_id, owner, per_principal, per_node)
            if host is not None:
                return SessionRef(host, session_id), refused
        return await self._live_or_starting(session_id), refused

    async def open_alias(self, alias: str, owner: str, per_principal: int,
                         per_node: int) -> tuple[SessionRef | StartingSession, bool]:
        """The session bound to `alias` (live, or brought back from the store
        if it ended), else a warm one bound to it now, counted as live for
        `owner` (the directory's `admit`); → (session, resumed). A session
        that needs a new actor comes back as a `StartingSession` (its id
        known, its actor still starting) for the caller to await. Refused by
        a session cap: `LimitError`, and nothing starts for it (a warm
        session taken for it ends, its actor back to the spares), so a
        device knocking on a full server does not leave an idle actor behind
        each time.

        One directory call binds, finds and admits: the offered id is a warm
        session's when one is ready, else a new one, whose actor starts only
        once the directory has answered that it won (a returning device
        never waits for a new actor it does not need; the three calls this
        used to make without a warm one stretched a burst's hellos to 1-2 s
        while new workers booted on the same cores)."""
        entry = await asyncio.to_thread(self._take_warm_entry, True)
        offered = entry[0].session_id if entry is not None else new_session_id()
        try:
            winner, host, refused = await self._directory.bind_and_admit.remote(alias, offered, owner,
                                                                               per_principal, per_node)
        except BaseException:  # cancelled, or the directory is gone: the offer goes back
            if entry is not None:
                self._put_back_warm(entry)
            raise
        if entry is not None and winner != offered:  # the alias had a session: the warm one offered goes back
            await asyncio.to_thread(self._put_back_warm, entry)
            entry = None
        if entry is not None:  # taken for good (bound to the alias: nobody else may get it)
            self._keep_offered()
            self._refill_soon()
        if refused is not None:
            if entry is not None:
                entry[0].close.remote()  # its actor back to the spares
            raise LimitError(refused)
        if winner == offered:
            if entry is not None:
                return entry[0], False
            try:
                return self._new_actor(offered), False
            except LimitError:
                await self._directory.release.remote(offered)  # its place; the alias finds it on the retry
                raise
        # bound before (or by another replica a moment ago): that session, brought back if it ended
        if self._starting.get(winner) is None and host is not None:
            return SessionRef(host, winner), True
        return await self._live_or_starting(winner), True

    def after_hello(self, session_id: str, ready: Awaitable[SessionRef]) -> StartingSession:
        """A live session whose last step before use (`ready`: its claim)
        runs after the socket's hello; listed as starting until it has, so
        another caller naming the id waits for it (`started`)."""
        return StartingSession(session_id, ready, self._starting, starts_actor=False)

    def _refill_soon(self) -> None:
        """Refill the warm pool off the caller's path (a hello waits for none
        of it); the pool's own thread would get there within a few seconds."""
        task = asyncio.get_running_loop().run_in_executor(None, self.refill)
        self._refills.add(task)
        task.add_done_callback(self._refills.discard)

    async def started(self, session_id: str) -> None:
        """Once a session this ingress is starting (for a socket that said
        hello) is up and claimed, and its socket subscribed; at once for any
        other. Whether the start failed is for `open` to say."""
        starting = self._starting.get(session_id)
        if starting is not None:
            with contextlib.suppress(Exception):
                await starting.settled()

    async def _live_or_starting(self, session_id: str) -> SessionRef | StartingSession:
        starting = self._starting.get(session_id)
        if starting is not None:  # started here a moment ago (its socket said hello): the same start, settled
            return StartingSession(session_id, starting.settled())
        found = await find_session(self.config, session_id, self._directory)
        if found is not None:
            return found
        return self._new_actor(session_id)

    def _new_actor(self, session_id: str) -> StartingSession:
        """`session_id` on a new actor, unless `limits.max_starting_sessions`
        wait for theirs already: then `LimitError("limit.starting_sessions")`
        at once, with the time the queue ahead takes to start as the retry
        hint (a burst past what the node starts in 30 s used to close the last
        sockets with 1011 after waiting all that time)."""
        waiting = sum(1 for s in self._starting.values() if s.starts_actor)
        if waiting >= self.config.limits.max_starting_sessions:
            raise LimitError("limit.starting_sessions",
                             retry_after_s=max(1.0, waiting * COLD_START_CPU_S / COLD_STARTS_AT_ONCE))
        return StartingSession(session_id, self._start(session_id), self._starting)

    def _after_hellos(self) -> None:
        """The last hello being answered went out: the refill it held back
        starts now rather than at the pool thread's next turn."""
        if len(self._warm) < self._target:
            self._refill_soon()

    async def _start(self, session_id: str) -> SessionRef:
        """`open_session`, at most `COLD_STARTS_AT_ONCE` at a time, once the
        hellos in flight are out (at most `HELLOS_FIRST_MAX_S` later)."""
        self._cold_waiting += 1
        try:
            deadline = time.monotonic() + HELLOS_FIRST_MAX_S
            while self.hello_in_flight.count and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            async with self._cold_starts:
                return await open_session(self.config, session_id, self._directory)
        finally:
            self._cold_waiting -= 1

    def shutdown(self) -> None:
        self._stopped.set()
        with self._lock:
            for ref, _ in self._warm:
                ref.close.remote()  # to the spares, or exit
            self._warm.clear()
