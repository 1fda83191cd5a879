"""Opening sessions: new and idle session actors, finding and bringing back
a session, and collecting the turns an input started.

`open_session` finds a live session or brings it back on a spare (an actor
whose session ended) or a new actor; the ingress's warm pool is
actors/session_manager.py. `collect_turns` gathers the turns an input
started from a session's events, for the ingress and for `SessionHandle`
(actors/notebook.py: notebooks, scripts and the CLI).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
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
from actors.session_ref import SessionRef, host_actor_name
from actors.worker_env import session_runtime_env

OPEN_ATTEMPTS = 3


def new_session_id() -> str:
    return uuid.uuid4().hex[:16]


def new_session_actor(config: AppConfig) -> ray.actor.ActorHandle:
    """A new, idle session actor (it hosts nothing, and has no config, until `host`).

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
        runtime_env=session_runtime_env(config),
    ).remote()


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
