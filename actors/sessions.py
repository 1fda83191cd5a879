"""Opening sessions: the warm pool and a handle for scripts and notebooks.

A cold Ray actor takes ~0.4 s to start (DESIGN §2), so `SessionManager`
keeps `server.warm_sessions` idle session actors started ahead, each already
hosting the id it will be handed out under; it takes the directory's spares
(actors whose session ended) before it starts new ones. `collect_turns`
gathers the turns an input started from a session's events, for the ingress
and for `SessionHandle` (actors/notebook.py: notebooks, scripts and the CLI).
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
from actors.pools import pinned_to
from actors.session import EventStream, SessionActor
from actors.session_directory import session_directory
from actors.session_ref import SessionRef, StartingSession, host_actor_name

STARTS_AT_ONCE = 1
COLD_STARTS_AT_ONCE = 2
"""Sessions that need a new actor (a burst beyond the warm pool) start at
most this many at a time: each new Ray worker boots on ~1 s of CPU, and
eight at once on two cores slowed every hello and live session for seconds,
while started in turn the first of them are ready sooner. The warm pool's
refill waits while any of them waits (`refill`)."""
REFILL_PERIOD_S = 0.5
KEEPALIVE_SHARE = 0.25
"""Warm actors are touched every idle_timeout_s × this, so they never reap
themselves while their pool holds them (else the pool would hand out dead
actors after a quiet spell)."""
OPEN_ATTEMPTS = 3


def new_session_id() -> str:
    return uuid.uuid4().hex[:16]


def new_session_actor(config: AppConfig) -> ray.actor.ActorHandle:
    """A new, idle session actor (it hosts nothing until `host`).

    No Ray task events: a session makes several calls a second for as long
    as it lives, and Ray keeps an event per call in the GCS (and the
    dashboard agent) for the dashboard's task view; the 30-minute soak
    measured the GCS growing ~0.6 MB per session that came and went.

    On the caller's node (the ingress replica's, a notebook's): the socket's
    every batch of frames and of events crosses between the two, and the
    node's pools serve it. Ray would place a zero-resource actor on any node
    (bench/cluster.py: 8 of 12 sessions on one of 3 nodes)."""
    return SessionActor.options(
        name=host_actor_name(uuid.uuid4().hex), namespace=config.server.namespace,
        lifetime="detached", enable_task_events=False,
        scheduling_strategy=pinned_to(ray.get_runtime_context().get_node_id(), num_cpus=0),
    ).remote(config)


def idle_session_actor(config: AppConfig, directory: ray.actor.ActorHandle) -> ray.actor.ActorHandle:
    """A spare on this node if the directory has one, else a new actor
    (blocking: one call to the directory)."""
    node = ray.get_runtime_context().get_node_id()
    return ray.get(directory.take_spare.remote(node)) or new_session_actor(config)


async def find_session(config: AppConfig, session_id: str,
                       directory: ray.actor.ActorHandle | None = None) -> SessionRef | None:
    """The live session `session_id`, or None."""
    directory = directory or await asyncio.to_thread(session_directory, config)
    actor = await directory.locate.remote(session_id)
    return None if actor is None else SessionRef(actor, session_id)


async def open_session(config: AppConfig, session_id: str,
                       directory: ray.actor.ActorHandle | None = None) -> SessionRef:
    """The live session `session_id`, else the same session brought back on
    an idle actor with what the store kept (a new session if it kept none);
    → once it is started."""
    directory = directory or await asyncio.to_thread(session_directory, config)
    for attempt in range(OPEN_ATTEMPTS):
        found = await find_session(config, session_id, directory)
        if found is not None:
            return found
        actor = await asyncio.to_thread(idle_session_actor, config, directory)
        try:
            await actor.host.remote(session_id, config)
            return SessionRef(actor, session_id)
        except ray.exceptions.RayActorError:  # another caller brought it back first, or a spare that had just left
            if attempt == OPEN_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


class SessionManager:
    """Hands out session actors, from the warm pool when it has one."""

    def __init__(self, config: AppConfig, warm: int | None = None) -> None:
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
        self._directory = session_directory(config)  # started now: a device's first connect won't wait
        threading.Thread(target=self._keep_warm, name="warm-pool", daemon=True).start()
        self.refill()

    def refill(self) -> None:
        """Start warm actors up to the target, at most `STARTS_AT_ONCE` at a
        time: starting a Ray worker costs ~1 s of CPU, and a burst of them
        starved the live sessions on the same cores (bench: p50 end of speech
        → first audio 1.5 s → 2.4 s at 8 sessions). None while a session
        waits for its own actor: a client that is here comes first."""
        if self._cold_waiting:
            return
        with self._lock:
            starting = [ready for _, ready in self._warm]
            done = ray.wait(starting, num_returns=len(starting), timeout=0)[0] if starting else []
            in_flight = len(starting) - len(done)
            while len(self._warm) < self._target and in_flight < STARTS_AT_ONCE:
                actor = idle_session_actor(self.config, self._directory)
                sid = new_session_id()
                self._warm.append((SessionRef(actor, sid), actor.host.remote(sid, self.config)))
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
        """A warm session taken but not used goes back first in line (or to
        the spares, if the pool refilled meanwhile)."""
        with self._lock:
            if len(self._warm) < self._target:
                self._warm.appendleft(entry)
                return
        entry[0].close.remote()

    def _take_warm_entry(self) -> tuple[SessionRef, ray.ObjectRef] | None:
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
                return ref, ready
        return None

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
            sid = new_session_id()
            return StartingSession(sid, self._start(sid), self._starting)
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
                         per_node: int) -> tuple[SessionRef | StartingSession, bool, str | None]:
        """The session bound to `alias` (live, or brought back from the store
        if it ended), else a warm one bound to it now, counted as live for
        `owner` (the directory's `admit`); → (session, resumed, the limit
        code that refuses it or None). A session that needs a new actor comes
        back as a `StartingSession` (its id known, its actor still starting)
        for the caller to await.

        One directory call binds, finds and admits: the offered id is a warm
        session's when one is ready, else a new one, whose actor starts only
        once the directory has answered that it won (a returning device
        never waits for a new actor it does not need; the three calls this
        used to make without a warm one stretched a burst's hellos to 1-2 s
        while new workers booted on the same cores)."""
        entry = await asyncio.to_thread(self._take_warm_entry)
        offered = entry[0].session_id if entry is not None else new_session_id()
        winner, host, refused = await self._directory.bind_and_admit.remote(alias, offered, owner,
                                                                           per_principal, per_node)
        if winner == offered:
            if entry is not None:
                self._refill_soon()
                return entry[0], False, refused
            return StartingSession(offered, self._start(offered), self._starting), False, refused
        # bound before (or by another replica a moment ago): that session, brought back if it ended
        if entry is not None:
            await asyncio.to_thread(self._put_back_warm, entry)
        if self._starting.get(winner) is None and host is not None:
            return SessionRef(host, winner), True, refused
        return await self._live_or_starting(winner), True, refused

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
        return StartingSession(session_id, self._start(session_id), self._starting)

    async def _start(self, session_id: str) -> SessionRef:
        """`open_session`, at most `COLD_STARTS_AT_ONCE` at a time."""
        self._cold_waiting += 1
        try:
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


async def collect_turns(actor: SessionRef, send: Callable[[], Awaitable[int]],
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


async def collect_turn(actor: SessionRef, send: Callable[[], Awaitable[bool]],
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


async def send_recording(actor: SessionRef, frames: list[bytes], per_batch: int = 10) -> int:
    """Send a recording in batches as a new audio stream; → how many
    utterances the VAD found in it (each becomes a turn), counted once the
    session has run all of it through the VAD."""
    stream = uuid.uuid4().hex
    before = await actor.utterances.remote()
    for i in range(0, len(frames), per_batch):
        batch = [(i + j, f) for j, f in enumerate(frames[i:i + per_batch])]
        await actor.send_audio.remote(batch, 16000, stream)
    return await actor.utterances.remote(settle=True) - before


async def send_utterance(actor: SessionRef, frames: list[bytes], per_batch: int = 10) -> bool:
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
