"""SessionActor: one Ray actor per client session, named `session:<id>`.

The ingress, a reconnecting client and a notebook all find the same actor by
name. It is detached so it outlives whoever created it (DESIGN §7), and it
ends itself after `session.idle_timeout_s` without input or listeners.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from typing import Any

import ray

from actors.agent.persona import persona_config
from actors.config import AppConfig
from actors.events import ErrorCode, ErrorEvent, Event
from actors.history_store import HistoryStore, StoredSession
from actors.providers import build_vad
from actors.providers.base import SAMPLE_RATE
from actors.providers.stages import chained_llm, chained_stt, chained_tts
from actors.session_core import SessionCore
from actors.tts import OutputPrefs

log = logging.getLogger(__name__)


EVENT_BATCH_MAX = 64


_default_output: contextvars.ContextVar[OutputPrefs | None] = contextvars.ContextVar(
    "default_output", default=None)


@contextlib.contextmanager
def subscribing_as(*, sample_rate: int | None = None, speak: bool | None = None,
                   pace: bool | None = None) -> Iterator[None]:
    """Event streams opened in this block (in this task) take these output
    settings unless they set their own: lets an HTTP route ask for text-only
    or unpaced output from helpers that open the stream (`collect_turn`)."""
    token = _default_output.set(OutputPrefs(sample_rate, speak, pace).over(_default_output.get()))
    try:
        yield
    finally:
        _default_output.reset(token)


class EventStream:
    """One subscriber's view of a session's events, one event at a time.

    Output belongs to the subscriber, not the session: `sample_rate` (its
    audio's rate), `speak` (False: text only, no audio) and `pace` (False:
    the whole reply at once, when no other listener wants real time). Unset
    ones come from an enclosing `subscribing_as`, then the session's config."""

    def __init__(self, actor: ray.actor.ActorHandle, exclusive: str | None = None, *,
                 sample_rate: int | None = None, speak: bool | None = None, pace: bool | None = None) -> None:
        output = OutputPrefs(sample_rate, speak, pace).over(_default_output.get())
        self._gen = actor.events.remote(exclusive, output)
        self._buffer: deque[Event] = deque()

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Event:
        while not self._buffer:
            ref = await self._gen.__anext__()
            self._buffer.extend(await ref)
        return self._buffer.popleft()

    def close(self) -> None:
        ray.cancel(self._gen)


def session_actor_name(session_id: str) -> str:
    return f"session:{session_id}"


def directory_name() -> str:
    return "sessions:directory"


def build_core(session_id: str, config: AppConfig, store: HistoryStore | None = None,
               stored: StoredSession | None = None) -> SessionCore:
    """Wire a session to its providers (local VAD and LLM, pooled STT and
    TTS) and to its store, resuming what the store kept (`stored`, read by
    the caller: the store is async, this is not)."""
    stored = stored or StoredSession()
    config = persona_config(config, config.persona(stored.persona))  # resumed: the same persona as before
    stt, llm, tts = chained_stt(config), chained_llm(config), chained_tts(config)
    core = SessionCore(
        session_id, config, vad=build_vad(config), stt=stt, llm=llm, tts=tts,
        provider_names={"vad": config.vad.provider, "stt": config.stt.provider,
                        "llm": config.llm.provider, "tts": config.tts.provider},
        history=stored.messages, memory=stored.memory, store=store, summary=stored.summary,
    )
    for chain in (stt.chain, llm.chain, tts.chain):
        chain.notify = core.provider_failover
    # every engine, the embedded one included, answers from the pool's hits in its prompt (ingested documents too)
    from actors.agent.knowledge_pool import get_knowledge_pool

    core.use_knowledge(get_knowledge_pool(config.knowledge, config.server.namespace))
    return core


# No Ray restart: a dead session is reopened from the store by the ingress
# connection that notices it (docs/architecture.md, "When parts die").
@ray.remote(num_cpus=0, max_restarts=0)
class SessionActor:
    def __init__(self, session_id: str, config: AppConfig) -> None:
        self._config = config
        self._session_id = session_id
        self._store = HistoryStore.from_config(config)
        self._core_or_none: SessionCore | None = None
        self._starting = asyncio.Lock()  # binds to the actor's loop on first use (Python >= 3.10)
        self._created = time.time()
        self._owner: str | None = None
        self._memory: Any = None
        self._exclusive: asyncio.Queue[Event] | None = None

    async def _ensure_started(self) -> SessionCore:
        """Build the session from what the store kept, once, in the actor's
        event loop (the store is async and a PostgreSQL pool belongs to one
        loop; `__init__` has none). A warm actor does this in `ready()`, long
        before a client arrives; a resumed one in its first call (one query).
        A store that cannot be read raises here, and the next call tries
        again: starting empty would overwrite the kept conversation."""
        if self._core_or_none is None:
            async with self._starting:
                if self._core_or_none is None:
                    stored = await self._store.snapshot(self._session_id) if self._store else StoredSession()
                    core = build_core(self._session_id, self._config, self._store, stored)
                    self._owner = stored.owner
                    core.start()
                    self._core_or_none = core
                    asyncio.get_running_loop().create_task(self._reap_when_idle())
        return self._core_or_none

    @property
    def _core(self) -> SessionCore:
        """The session, for code that runs only after `_ensure_started`."""
        assert self._core_or_none is not None, "session not started"
        return self._core_or_none

    async def ready(self) -> str:
        return (await self._ensure_started()).session_id

    async def send_audio(self, frames: list[tuple[int | None, bytes]], sample_rate: int = SAMPLE_RATE,
                         stream: str = "") -> int:
        """A batch of (sequence number, PCM16 frame); returns frames accepted."""
        return (await self._ensure_started()).send_audio(frames, sample_rate, stream)

    async def send_text(self, text: str) -> int | None:
        return (await self._ensure_started()).send_text(text)

    async def greet(self) -> int:
        """A device woke up: say the persona's greeting, as a turn of its own."""
        core = await self._ensure_started()
        return core.say(core.dialogue.persona.greeting_text())

    async def set_persona(self, persona_id: str) -> str:
        """Become the persona `persona_id` (checked by the caller against the
        config) from the next turn on, and keep it with the conversation."""
        if not self._config.has_persona(persona_id):
            raise ValueError(f"no persona {persona_id!r}")
        await self._ensure_started()
        if self._core.dialogue.persona.id != persona_id:
            config = persona_config(self._config, self._config.persona(persona_id))
            llm, tts = chained_llm(config), chained_tts(config)
            for chain in (llm.chain, tts.chain):
                chain.notify = self._core.provider_failover
            self._core.set_persona(config.persona(), llm, tts)
        if self._store is not None:
            await self._store.set_persona(self._session_id, persona_id)
        return persona_id

    async def utterances(self, settle: bool = False) -> int:
        """How many utterances the VAD has opened; with `settle`, after all
        audio sent so far has been through it (so a caller can tell that a
        recording held no speech instead of waiting for a turn)."""
        core = await self._ensure_started()
        if settle:
            await core.audio.drained()
        return core.audio.utterances

    async def interrupt(self) -> bool:
        return (await self._ensure_started()).interrupt()

    async def listen(self, state: str, mode: str = "auto") -> None:
        (await self._ensure_started()).listen(state, mode)

    async def claim(self, owner: str) -> bool:
        """First caller becomes the owner; later callers must be the same
        principal, so a guessed session id does not open someone's session.
        The owner is kept in the store with the conversation, so it outlives
        this actor: whoever names the id after the actor ended is checked
        against the same owner."""
        await self._ensure_started()
        if self._owner is None:
            # one conditional write: two replicas racing for this id get the same winner
            self._owner = owner if self._store is None else await self._store.claim(self._session_id, owner)
        if self._owner == owner:
            # a claim is the client arriving: its socket subscribes next, so the
            # orphan clock starts now, not when the actor was made (a warm one)
            self._core.last_activity = time.monotonic()
            await self._attach_memory()
        return self._owner == owner

    async def _attach_memory(self) -> None:
        """The owner's long-term memory, once the owner is known (a claimed
        session; a notebook's unclaimed session has none)."""
        if self._memory is not None or self._owner is None or not self._config.memory.enabled:
            return
        from actors.agent.memory import MemoryStore

        store = MemoryStore(self._config.memory)
        try:
            await store.open()
        except Exception as e:  # a database that is down must not stop the conversation
            log.warning("session %s: long-term memory unavailable: %s", self._core.session_id, type(e).__name__)
            return
        self._memory = store
        self._core.use_memory(store, self._owner)

    async def touch(self) -> None:
        """The warm pool's keep-alive: an unclaimed actor in a live pool is
        not idle; once the pool is gone, it reaps itself after idle_timeout_s."""
        if self._core_or_none is not None:  # not started yet: its idle clock has not started either
            self._core_or_none.last_activity = time.monotonic()

    async def device_message(self, kind: str, payload: Any) -> None:
        (await self._ensure_started()).device_message(kind, payload)

    async def events(self, exclusive: str | None = None,
                     output: OutputPrefs | None = None) -> AsyncIterator[list[Event]]:
        """The session's event stream (a Ray streaming generator) in batches:
        each item is every event queued at that moment (up to 64), because
        each item crossing processes costs ~1 ms while a reply's words arrive
        in bursts. Read it through `EventStream`. The first event is always
        `session.started`: wait for it before sending input, because Ray may
        start this call after a later one.

        `exclusive` (a device's connection) makes this the session's only
        exclusive listener: the one it replaces gets `session.replaced` and
        its stream ends, so a second socket with the same device credentials
        takes over the device's session and never listens in beside it.

        `output` is this subscriber's own output (rate, speech, pacing;
        `OutputPrefs`): a text-only listener never mutes a device listening
        to the same session."""
        core = await self._ensure_started()
        q = core.subscribe(output)
        if exclusive is not None:
            previous, self._exclusive = self._exclusive, q
            if previous is not None and previous is not q:
                if previous.full():  # a stalled reader still learns it was replaced
                    previous.get_nowait()
                previous.put_nowait(ErrorEvent(session_id=core.session_id, turn_id=core.turn_id,
                                               code=ErrorCode.SESSION_REPLACED,
                                               message="another connection with this device's credentials "
                                                       "took over the session"))
        try:
            while not core.closed:
                batch = [await q.get()]
                while not q.empty() and len(batch) < EVENT_BATCH_MAX:
                    batch.append(q.get_nowait())
                yield batch
                if any(isinstance(e, ErrorEvent) and e.code in (ErrorCode.SESSION_REPLACED, ErrorCode.SESSION_CLOSED)
                       for e in batch):
                    return  # replaced, or the session ended: the listener's stream ends with it
        finally:
            core.unsubscribe(q)
            if self._exclusive is q:
                self._exclusive = None

    async def history(self) -> list[dict[str, Any]]:
        return [m.model_dump() for m in (await self._ensure_started()).history()]

    async def stats(self) -> dict[str, Any]:
        import os

        from actors.providers.adapters.usage import provider_report

        core = await self._ensure_started()
        if core.reply_turn is not None:
            state = "replying"
        elif core.audio.in_speech:
            state = "listening"
        else:
            state = "idle"
        return {**core.stats(), "pid": os.getpid(), "created": self._created,
                "device_state": core.device_state,
                # for the control panel (actors/ingress/admin.py)
                "owner": self._owner, "persona": core.dialogue.persona.id, "state": state,
                "closed": core.closed, "idle_s": round(time.monotonic() - core.last_activity, 1),
                "node_id": ray.get_runtime_context().get_node_id(),
                # this process's breakers and provider counters: the session's own (one per process)
                "providers": provider_report()}

    async def close(self, forget: bool = False) -> None:
        """End the session; `forget` also deletes its stored conversation.
        Listeners get `session.closed` first, which ends their event streams
        (a socket closes normally on it): the actor can only exit once no
        call of theirs is still running."""
        core = await self._ensure_started()
        if not core.closed and core.subscribers:
            core.emit_error(ErrorCode.SESSION_CLOSED, "the session was ended")
            await asyncio.sleep(0.05)
        await self._end(forget)
        ray.actor.exit_actor()

    async def _end(self, forget: bool = False) -> None:
        """Close the session (its last save included), then the store's connections."""
        await self._core.close()
        if self._store is not None:
            try:
                if forget:
                    await self._core.forget_history()
            finally:
                await self._store.close()
        try:  # free its place in the caller's session cap at once
            ray.get_actor(directory_name(), namespace=self._config.server.namespace).release.remote(
                self._core.session_id)
        except Exception:  # no directory (a notebook's cluster): nothing holds a place
            pass

    def _idle_limit(self) -> float:
        """A claimed session with no client left ends after orphan_timeout_s
        (its conversation is in the store); otherwise after idle_timeout_s."""
        cfg = self._config.session
        if self._owner is not None and self._core.subscribers == 0:
            return min(cfg.orphan_timeout_s, cfg.idle_timeout_s)
        return cfg.idle_timeout_s

    async def _reap_when_idle(self) -> None:
        cfg = self._config.session
        period = max(0.2, min(cfg.idle_timeout_s, cfg.orphan_timeout_s, 120.0) / 4)
        while not self._core.closed:
            await asyncio.sleep(period)
            idle = time.monotonic() - self._core.last_activity
            if idle >= self._idle_limit() and self._core.subscribers == 0 and self._core.reply_turn is None:
                log.info("session %s idle for %.0f s; ending", self._core.session_id, idle)
                break
        # idle, or ended from inside (the end_conversation tool): free the place and the process
        await self._end()
        ray.actor.exit_actor()
