"""Draining an ingress replica that Serve is shutting down.

Why not `__del__`: Ray Serve (2.60, `ray/serve/_private/replica.py`,
`_perform_graceful_shutdown`) first waits, polling every
`graceful_shutdown_wait_loop_s`, until the replica has no ongoing request,
and only then calls the deployment's `__del__`. A WebSocket is one ongoing
request for its whole life, so with a socket open `__del__` never runs before
the controller kills the replica at `graceful_shutdown_timeout_s`: every
client would just be cut off. What the replica does know at once is its own
`_shutting_down` flag, set as the graceful shutdown begins (a redeploy with a
new version, a scale-down, `serve.delete`). `ReplicaDrainWatch` polls that
flag (one attribute read every `POLL_S`) and starts the drain; each socket
then finishes or cuts the reply in flight (`server.drain_grace_s`), says
`goodbye` and closes with 1012, so the ongoing count falls to zero and Serve
finishes the shutdown (and calls `__del__`, which drains too, for the record).
Session actors live outside the replica and are never ended by a drain.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from typing import Any, Protocol

log = logging.getLogger(__name__)

POLL_S = 0.25
"""How often the watch reads the replica's shutdown flag: the delay before
sockets hear of a shutdown, against one attribute read per tick."""
CLOSE_CODE = 1012
"""WebSocket close code "service restart" (RFC 6455 registry): come back later."""
REASON = "server.restart"
RETRY_AFTER_MS = (250, 1500)
"""The range a socket's `retry_after_ms` is drawn from, so that the clients
of a drained replica do not all knock on the next one in the same instant."""


class Drainable(Protocol):
    """What the drain asks of an open connection (VoiceConnection fits)."""

    def request_drain(self, grace_s: float, retry_after_ms: int) -> None: ...


def retry_after_ms(rng: random.Random | None = None) -> int:
    """A reconnect delay hint for one socket, jittered across RETRY_AFTER_MS."""
    low, high = RETRY_AFTER_MS
    return (rng or random).randint(low, high)


class Drain:
    """This replica's open connections, and whether it is draining.

    Connections register for their lifetime; `start()` asks each to drain
    (finish or cut its reply, goodbye, close 1012) and marks the replica as
    draining, so a socket that still reaches it is turned away the same way
    at once. Idempotent: the watch, `__del__` and tests may all call it."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.draining = False
        self._connections: set[Drainable] = set()

    def add(self, connection: Drainable) -> None:
        self._connections.add(connection)
        if self.draining:  # registered in the instant the drain began
            connection.request_drain(0.0, retry_after_ms())

    def discard(self, connection: Drainable) -> None:
        self._connections.discard(connection)

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    def start(self) -> int:
        """Begin draining; → how many sockets were asked to leave."""
        if self.draining:
            return 0
        self.draining = True
        for connection in list(self._connections):
            connection.request_drain(self.grace_s, retry_after_ms())
        if self._connections:
            log.info("ingress replica shutting down: draining %d socket(s), grace %.1f s",
                     len(self._connections), self.grace_s)
        return len(self._connections)


def find_replica_flag() -> Callable[[], bool] | None:
    """A reader of this Serve replica's `_shutting_down` flag, or None outside
    a replica (or if a Ray release renamed it: then the drain falls back to
    Serve's own behaviour, sockets cut at `graceful_shutdown_timeout_s`, which
    clients survive by reconnecting as after a crash).

    The flag lives on the replica's implementation object, which Ray keeps
    as this worker's actor instance; reading it is one attribute access and
    safe from the user-code thread (a bool written by the replica's loop)."""
    try:
        from ray._private.worker import global_worker
    except ImportError:  # pragma: no cover - Ray without this internal
        return None
    for actor in list(getattr(global_worker, "actors", {}).values()):
        impl: Any = getattr(actor, "_replica_impl", None)
        if impl is not None and isinstance(getattr(impl, "_shutting_down", None), bool):
            return lambda: bool(impl._shutting_down)
    return None


class ReplicaDrainWatch:
    """Starts `drain` when Serve begins shutting this replica down.

    Started lazily from the first socket (the replica's user loop does not
    run yet in the deployment's `__init__`); one task per replica."""

    def __init__(self, drain: Drain, flag: Callable[[], bool] | None = None, poll_s: float = POLL_S) -> None:
        self._drain = drain
        self._flag = flag
        self._poll_s = poll_s
        self._task: asyncio.Task[None] | None = None
        self._looked = flag is not None

    def ensure_started(self) -> None:
        if self._task is not None or self._drain.draining:
            return
        if not self._looked:
            self._looked = True
            self._flag = find_replica_flag()
            if self._flag is None:
                log.warning("cannot see this Serve replica's shutdown flag: sockets will not be drained "
                            "with a goodbye on a redeploy (clients reconnect after the cut)")
        if self._flag is not None:
            self._task = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        assert self._flag is not None
        while not self._drain.draining:
            if self._flag():
                self._drain.start()
                return
            await asyncio.sleep(self._poll_s)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
