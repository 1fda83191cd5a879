"""Opening sessions: the warm pool and a handle for scripts and notebooks.

A cold Ray actor takes ~0.4 s to start (DESIGN §2), so `SessionManager`
keeps `server.warm_sessions` idle session actors started ahead, each already
named with the id it will be handed out under. `collect_turns` gathers the
turns an input started from a session's events, for the ingress and for
`SessionHandle` (actors/notebook.py: notebooks, scripts and the CLI).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from actors.audio import write_wav
from actors.config import AppConfig
from actors.events import AudioChunk, ErrorEvent, Event, LLMDelta, STTFinal, TurnMetrics
from actors.history_store import HistoryStore
from actors.session import EventStream, SessionActor, directory_name, session_actor_name

STARTS_AT_ONCE = 1
REFILL_PERIOD_S = 0.5
KEEPALIVE_SHARE = 0.25
"""Warm actors are touched every idle_timeout_s × this, so they never reap
themselves while their pool holds them (else the pool would hand out dead
actors after a quiet spell)."""


def new_session_id() -> str:
    return uuid.uuid4().hex[:16]


def create_session_actor(config: AppConfig, session_id: str) -> ray.actor.ActorHandle:
    """The session's actor (started, or the live one of that name).

    No Ray task events: a session makes several calls a second for as long
    as it lives, and Ray keeps an event per call in the GCS (and the
    dashboard agent) for the dashboard's task view; the 30-minute soak
    measured the GCS growing ~0.6 MB per session that came and went."""
    return SessionActor.options(
        name=session_actor_name(session_id), namespace=config.server.namespace,
        lifetime="detached", get_if_exists=True, enable_task_events=False,
    ).remote(session_id, config)


def find_session(config: AppConfig, session_id: str) -> ray.actor.ActorHandle | None:
    try:
        return ray.get_actor(session_actor_name(session_id), namespace=config.server.namespace)
    except ValueError:
        return None


@ray.remote(num_cpus=0, max_restarts=-1)
class SessionDirectory:
    """Shared by every replica: stable names (a device's id) → session ids,
    and which live session actors each principal holds.

    A device must get its own session back on every connection, yet a session
    named after the device would always start cold (~1 s for a new Ray worker),
    while warm sessions are named before anyone asks for them. The directory
    maps the device to whichever warm session it was given first.

    Live sessions are counted here, not per replica, because each costs a
    process (~80 MB) wherever it was opened: a caller may hold
    `per_principal` of them and the cluster `per_node` × alive nodes. A session
    actor releases its place when it ends; places of actors that died without
    saying so are found and freed when a cap is reached.

    Every method is async, so all of them run on the actor's one event loop
    and never beside each other in threads.

    The alias → session map is written through to the session store (the
    `dict` is its cache), so a device still gets its own session after this
    actor restarted (Ray restarts it: `max_restarts=-1`) or the whole server
    did, on any node when the store is PostgreSQL. The live counts are not
    stored: after a restart they are rebuilt as sessions are admitted again.
    """

    def __init__(self, namespace: str = "", config: AppConfig | None = None) -> None:
        self._namespace = namespace
        self._store = HistoryStore.from_config(config) if config is not None else None
        self._ids: dict[str, str] = {}
        self._live: dict[str, str] = {}  # session id -> owner
        self._nodes = (0.0, 1)  # (when counted, alive nodes)

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

    async def admit(self, session_id: str, owner: str, per_principal: int, per_node: int) -> str | None:
        """Count `session_id` as live for `owner`; → None, or the limit code that refuses it."""
        if self._live.get(session_id) == owner:
            return None
        if sum(1 for o in self._live.values() if o == owner) >= per_principal:
            self._prune(owner)
            if sum(1 for o in self._live.values() if o == owner) >= per_principal:
                return "limit.live_sessions"
        if len(self._live) >= per_node * self._alive_nodes():
            self._prune(None)
            if len(self._live) >= per_node * self._alive_nodes():
                return "limit.cluster_sessions"
        self._live[session_id] = owner
        return None

    async def release(self, session_id: str) -> None:
        self._live.pop(session_id, None)

    async def live(self) -> dict[str, str]:
        return dict(self._live)

    def _prune(self, owner: str | None) -> None:
        for sid in [s for s, o in self._live.items() if owner is None or o == owner]:
            try:
                ray.get_actor(session_actor_name(sid), namespace=self._namespace)
            except ValueError:
                del self._live[sid]

    def _alive_nodes(self) -> int:
        counted_at, n = self._nodes
        if time.monotonic() - counted_at > 10:
            n = max(1, sum(1 for node in ray.nodes() if node.get("Alive")))
            self._nodes = (time.monotonic(), n)
        return n


class SessionManager:
    """Hands out session actors, from the warm pool when it has one."""

    def __init__(self, config: AppConfig, warm: int | None = None) -> None:
        self.config = config
        self._target = config.server.warm_sessions if warm is None else warm
        self._warm: deque[tuple[str, ray.actor.ActorHandle, ray.ObjectRef]] = deque()
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        threading.Thread(target=self._keep_warm, name="warm-pool", daemon=True).start()
        self._directory = SessionDirectory.options(
            name=directory_name(), namespace=config.server.namespace, lifetime="detached",
            get_if_exists=True).remote(config.server.namespace, config)  # started now: a device's first connect won't wait
        self.refill()

    def refill(self) -> None:
        """Start warm actors up to the target, at most `STARTS_AT_ONCE` at a
        time: starting a Ray worker costs ~1 s of CPU, and a burst of them
        starved the live sessions on the same cores (bench: p50 end of speech
        → first audio 1.5 s → 2.4 s at 8 sessions)."""
        with self._lock:
            starting = [ready for _, _, ready in self._warm]
            done = ray.wait(starting, num_returns=len(starting), timeout=0)[0] if starting else []
            in_flight = len(starting) - len(done)
            while len(self._warm) < self._target and in_flight < STARTS_AT_ONCE:
                sid = new_session_id()
                actor = create_session_actor(self.config, sid)
                self._warm.append((sid, actor, actor.ready.remote()))
                in_flight += 1

    def _keep_warm(self) -> None:
        keepalive_every = self.config.session.idle_timeout_s * KEEPALIVE_SHARE
        touched = time.monotonic()
        while not self._stopped.wait(min(REFILL_PERIOD_S, keepalive_every)):
            try:
                self.refill()
                if time.monotonic() - touched >= keepalive_every:
                    touched = time.monotonic()
                    with self._lock:
                        for _, actor, _ in self._warm:
                            actor.touch.remote()
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
            refs = [ready for _, _, ready in self._warm]
        return len(ray.wait(refs, num_returns=len(refs), timeout=0)[0]) if refs else 0

    def _take_warm(self) -> tuple[str, ray.actor.ActorHandle] | None:
        with self._lock:
            for _ in range(len(self._warm)):
                sid, actor, ready = self._warm.popleft()
                done, _ = ray.wait([ready], timeout=0)
                if done:
                    return sid, actor
                self._warm.append((sid, actor, ready))  # still starting: keep it for later
        return None

    def open(self, session_id: str | None = None) -> tuple[str, ray.actor.ActorHandle]:
        """Resume `session_id` if its actor lives, else start a session (warm if possible)."""
        if session_id:
            actor = create_session_actor(self.config, session_id)  # get_if_exists: resumes a live one
            return session_id, actor
        taken = self._take_warm()
        if taken is None:
            sid = new_session_id()
            taken = (sid, create_session_actor(self.config, sid))
        self.refill()
        return taken

    async def open_alias(self, alias: str) -> tuple[str, ray.actor.ActorHandle, bool]:
        """The session bound to `alias` (live, or brought back from the store
        if it was reaped), else a warm one bound to it now."""
        directory = self._directory
        sid = await directory.lookup.remote(alias)
        if sid is not None:
            actor = find_session(self.config, sid)
            if actor is None:  # reaped or ended: it comes back with its conversation from the store
                actor = await asyncio.to_thread(create_session_actor, self.config, sid)
            return sid, actor, True
        new_sid, actor = await asyncio.to_thread(self.open)
        winner = await directory.bind.remote(alias, new_sid)
        if winner != new_sid:  # another replica bound this device a moment ago
            return await self.open_alias(alias)
        return new_sid, actor, False

    def shutdown(self) -> None:
        self._stopped.set()
        with self._lock:
            for _, actor, _ in self._warm:
                ray.kill(actor)
            self._warm.clear()


@dataclass
class TurnResult:
    """One turn as a caller saw it: what was heard, what was answered, how fast."""

    turn_id: int
    transcript: str | None = None
    reply: str = ""
    audio: bytes = field(default=b"", repr=False)  # seconds of PCM would flood a notebook's output
    sample_rate: int = 16000
    metrics: dict[str, Any] = field(default_factory=dict)
    errors: list[ErrorEvent] = field(default_factory=list)
    events: list[Event] = field(default_factory=list, repr=False)

    @property
    def interrupted(self) -> bool:
        """True when something cut the reply short, e.g. the next utterance of
        the same recording (barge-in); `reply` and `audio` then hold what the
        turn produced before the cut."""
        return bool(self.metrics.get("interrupted"))

    def save_audio(self, path: str | Path) -> Path:
        write_wav(path, self.audio, self.sample_rate)
        return Path(path)


class TurnResults(list[TurnResult]):
    """Every turn that one input started, in order; empty when it held no speech.

    `errors` holds what belongs to no turn, such as frames the session refused;
    `since_turn` is the session's turn id when the input was sent (every turn
    here comes after it).
    """

    def __init__(self, turns: Iterable[TurnResult] = (), errors: Iterable[ErrorEvent] = (),
                 since_turn: int = 0) -> None:
        super().__init__(turns)
        self.errors = list(errors)
        self.since_turn = since_turn


class _TurnReader:
    """Folds one subscriber's events into the turns started after `after`.

    The pending read survives between calls, so waiting on something else
    (the sender) never cancels a read halfway and loses an event."""

    def __init__(self, events: EventStream) -> None:
        self._events = events
        self._next: asyncio.Future[Event] | None = None
        self.after = 0
        self.turns: dict[int, TurnResult] = {}
        self.stray_errors: list[ErrorEvent] = []

    async def subscribe(self, timeout_s: float) -> int:
        """Wait for `session.started`: from then on every event reaches us.
        → the session's turn id at that moment."""
        started = await asyncio.wait_for(self._events.__anext__(), timeout_s)
        self.after = started.turn_id
        return self.after

    async def read_one(self, deadline: float, also: asyncio.Future[Any] | None = None) -> None:
        """Fold the next event in, or return early when `also` finishes;
        TimeoutError once `deadline` (monotonic) passes."""
        if self._next is None:
            self._next = asyncio.ensure_future(self._events.__anext__())
        waiting = {self._next} if also is None else {self._next, also}
        done, _ = await asyncio.wait(waiting, timeout=max(0.0, deadline - time.monotonic()),
                                     return_when=asyncio.FIRST_COMPLETED)
        if not done:
            raise TimeoutError
        if self._next in done:
            read, self._next = self._next, None
            try:
                self._fold(read.result())
            except StopAsyncIteration:
                raise RuntimeError("the session's event stream ended before its turns did "
                                   "(the session closed)") from None

    async def read_until(self, deadline: float) -> None:
        with contextlib.suppress(TimeoutError):
            while True:
                await self.read_one(deadline)

    def _fold(self, ev: Event) -> None:
        if ev.turn_id <= self.after:
            if isinstance(ev, ErrorEvent):
                self.stray_errors.append(ev)
            return
        result = self.turns.setdefault(ev.turn_id, TurnResult(turn_id=ev.turn_id))
        result.events.append(ev)
        _fold(result, ev)

    def first(self, n: int) -> list[TurnResult]:
        return [self.turns[t] for t in sorted(self.turns)[:n]]

    def complete(self, n: int) -> bool:
        """A session ends every turn with exactly one `metrics` event, also a
        turn cut short, so n turns with metrics means the input is answered."""
        first = self.first(n)
        return len(first) == n and all(t.metrics for t in first)

    def all_errors(self) -> list[ErrorEvent]:
        return [*self.stray_errors, *(e for t in self.turns.values() for e in t.errors)]

    def close(self) -> None:
        if self._next is not None:
            self._next.cancel()
        self._events.close()


REFUSAL_GRACE_S = 0.3
"""After input that started no turn, how long to gather the errors it got."""


async def collect_turns(actor: ray.actor.ActorHandle, send: Callable[[], Awaitable[int]],
                        timeout_s: float = 60.0) -> TurnResults:
    """Subscribe, run `send()` (which sends input and returns how many turns it
    started: 0 if it was refused or held no speech), and gather those turns'
    events until each has ended with its `metrics` event.

    Events are read while `send()` runs, so a long recording cannot fill the
    session's event queue before anyone reads it. Turns are taken in order
    after the moment of subscribing: another client starting turns in this
    session at the same time would be counted among them."""
    reader = _TurnReader(EventStream(actor))
    deadline = time.monotonic() + timeout_s
    sending: asyncio.Future[int] | None = None
    try:
        since = await reader.subscribe(timeout_s)
        sending = asyncio.ensure_future(send())
        while not sending.done():
            await reader.read_one(deadline, also=sending)
        expected = sending.result()
        if expected == 0:  # no turn will come: report what the input got instead
            await reader.read_until(min(deadline, time.monotonic() + REFUSAL_GRACE_S))
            return TurnResults(errors=reader.all_errors(), since_turn=since)
        while not reader.complete(expected):
            await reader.read_one(deadline)
        return TurnResults(reader.first(expected), reader.stray_errors, since_turn=since)
    except TimeoutError:
        raise TimeoutError(f"no complete turn within {timeout_s:.0f} s") from None
    finally:
        if sending is not None and not sending.done():
            sending.cancel()
        reader.close()


async def collect_turn(actor: ray.actor.ActorHandle, send: Callable[[], Awaitable[bool]],
                       timeout_s: float = 60.0) -> TurnResult:
    """Like `collect_turns` for one turn: `send()` returns False if the input
    was refused. → the first turn the input started (the ingress answers one
    request with one turn), else a result holding the errors it got."""

    async def send_one() -> int:
        return 1 if await send() else 0

    turns = await collect_turns(actor, send_one, timeout_s)
    if turns:
        return turns[0]
    return TurnResult(turn_id=turns.since_turn, errors=turns.errors, events=list(turns.errors))


async def send_recording(actor: ray.actor.ActorHandle, frames: list[bytes], per_batch: int = 10) -> int:
    """Send a recording in batches as a new audio stream; → how many
    utterances the VAD found in it (each becomes a turn), counted once the
    session has run all of it through the VAD."""
    stream = uuid.uuid4().hex
    before = await actor.utterances.remote()
    for i in range(0, len(frames), per_batch):
        batch = [(i + j, f) for j, f in enumerate(frames[i:i + per_batch])]
        await actor.send_audio.remote(batch, 16000, stream)
    return await actor.utterances.remote(settle=True) - before


async def send_utterance(actor: ray.actor.ActorHandle, frames: list[bytes], per_batch: int = 10) -> bool:
    """`send_recording`, for callers that only ask: is a turn coming?"""
    return await send_recording(actor, frames, per_batch) > 0


def _fold(result: TurnResult, ev: Event) -> None:
    if isinstance(ev, STTFinal):
        result.transcript = ev.text
    elif isinstance(ev, LLMDelta):
        result.reply += ev.text
    elif isinstance(ev, AudioChunk):
        result.audio += ev.pcm16
        result.sample_rate = ev.sample_rate
    elif isinstance(ev, ErrorEvent):
        result.errors.append(ev)
    elif isinstance(ev, TurnMetrics):
        result.metrics = ev.model_dump(exclude={"type", "session_id", "ts"})


def __getattr__(name: str) -> Any:
    """`SessionHandle` lives in actors/notebook.py (which imports this
    module, hence the lazy import); `from actors.sessions import
    SessionHandle` keeps working."""
    if name == "SessionHandle":
        from actors.notebook import SessionHandle

        return SessionHandle
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
