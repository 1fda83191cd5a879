"""A session on the actor that hosts it: the handle every caller holds.

Session actors are reused: when a session ends, its actor (a Ray worker
process) goes back to the directory's spares and later hosts another
session. Ray keeps state for every actor ever created or called in each
process that did so (the ingress, the dashboard agent, the GCS: ~60–90 KB
each, measured by `bench.churn`), so one new actor per session grew a
server that runs for days without bound; reusing them does not.

A caller that still holds the actor after its session ended must never
reach the next one. So every call made through a `SessionRef` names the
session it is for (`session_id=`), and the actor refuses a call for a
session it no longer hosts with `SessionMoved`: a `RayActorError`, so
every path that brings back a dead session brings back this one too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Generator
from typing import Any

import ray
from ray.exceptions import RayActorError

HOST_PREFIX = "session-host:"


def host_actor_name(host_id: str) -> str:
    """Session actors are named by host, not by session: a name is for life."""
    return f"{HOST_PREFIX}{host_id}"


class SessionMoved(RayActorError):
    """The actor called no longer hosts this session (it ended, and the actor
    may host another one now): find the session again, as after a crash."""

    def __init__(self, session_id: str = "") -> None:
        super().__init__(error_msg=f"session {session_id or '?'} is no longer hosted by this actor")
        self.session_id = session_id

    def __reduce__(self) -> tuple[Any, ...]:
        return (SessionMoved, (self.session_id,))


def same_actor(a: ray.actor.ActorHandle, b: ray.actor.ActorHandle) -> bool:
    return a._actor_id == b._actor_id


class _SessionMethod:
    """`ref.method.remote(...)` = the actor's method, for this session only."""

    def __init__(self, method: Any, session_id: str) -> None:
        self._method = method
        self._session_id = session_id

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        return self._method.remote(*args, session_id=self._session_id, **kwargs)

    def options(self, **options: Any) -> _SessionMethod:
        return _SessionMethod(self._method.options(**options), self._session_id)


class SessionRef:
    """`actor` (the host's Ray handle) bound to `session_id`: use it like the
    actor handle (`await ref.send_text.remote("hi")`)."""

    def __init__(self, actor: ray.actor.ActorHandle, session_id: str) -> None:
        self.actor = actor
        self.session_id = session_id

    def __getattr__(self, name: str) -> _SessionMethod:
        if name.startswith("_"):
            raise AttributeError(name)
        return _SessionMethod(getattr(self.actor, name), self.session_id)

    def __repr__(self) -> str:
        return f"SessionRef({self.session_id!r})"


class StartingSession:
    """A session whose actor is still starting: no warm or spare actor was
    ready, and a new Ray worker takes ~1 s of CPU, seconds in a burst on a
    busy node. Its id is known already, so a socket says `hello` now (the
    xiaozhi firmware gives up on a hello after 10 s) and awaits this before
    it subscribes; the client's first audio waits in the socket meanwhile.
    Awaiting it gives the `SessionRef`, or raises what starting it raised.

    The client has the id from its hello and may use it at once elsewhere
    (an HTTP text turn for the session its device is on). So a session
    started in a `registry` (the session manager's) is listed there under
    its id until every step chained on it (`then`: a claim, a persona, the
    socket's subscription) has run: another caller asking for the id waits
    for `settled()` instead of starting it a second time, and its turn
    comes after the socket is listening."""

    def __init__(self, session_id: str, ready: Awaitable[SessionRef],
                 registry: dict[str, StartingSession] | None = None,
                 base: asyncio.Future[SessionRef] | None = None, starts_actor: bool = True) -> None:
        self.session_id = session_id
        self.starts_actor = starts_actor
        """False: a live actor whose claim follows the hello (a warm session), not a start."""
        self._ready: asyncio.Future[SessionRef] = asyncio.ensure_future(ready)
        self._base = base if base is not None else self._ready
        """The start itself, before any chained step."""
        self._registry = registry
        if registry is not None:
            registry[session_id] = self
            self._ready.add_done_callback(self._unlist)

    def _unlist(self, _: asyncio.Future[SessionRef]) -> None:
        if self._registry is not None and self._registry.get(self.session_id) is self:
            del self._registry[self.session_id]

    def then(self, step: Callable[[SessionRef], Awaitable[Any]]) -> StartingSession:
        """The same session, with `step` run on it once it is up (a claim, a
        persona, a subscription); listed in the registry in this one's place."""
        first = self._ready

        async def chained() -> SessionRef:
            ref = await first
            await step(ref)
            return ref

        return StartingSession(self.session_id, chained(), self._registry, self._base, self.starts_actor)

    async def settled(self) -> SessionRef:
        """The session for another caller: once the steps chained so far have
        run, whether or not they succeeded (a socket that closed before its
        subscription does not fail the others); raises only if the start did."""
        await asyncio.wait([self._ready])
        await asyncio.wait([self._base])
        return self._base.result()

    def __await__(self) -> Generator[Any, None, SessionRef]:
        return self._ready.__await__()
