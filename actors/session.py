"""SessionActor: the Ray actor a client session lives in.

The ingress, a reconnecting client and a notebook all reach the same actor
through the session directory (actors/session_directory.py). It is detached
so it outlives whoever created it (DESIGN §7); its session ends after
`session.idle_timeout_s` without input or listeners, and the actor then
hosts a later session or exits (actors/session_ref.py).
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
from actors.heap import release_memory
from actors.history_store import HistoryStore, StoredSession
from actors.providers import build_vad
from actors.providers.base import SAMPLE_RATE
from actors.providers.stages import chained_llm, chained_stt, chained_tts
from actors.session_channel import ActorChannel, ChannelHost, serve_session_channel
from actors.session_core import SessionCore
from actors.session_directory import session_directory
from actors.session_ref import SessionMoved, same_actor
from actors.session_stores import ActorStores
from actors.tts import OutputPrefs
from actors.worker_env import lean_serialization_context

log = logging.getLogger(__name__)


EVENT_BATCH_MAX = 64
RELEASE_AFTER_S = 0.5


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


def current_output(sample_rate: int | None = None, speak: bool | None = None,
                   pace: bool | None = None) -> OutputPrefs:
    """A new subscriber's output: these settings, the unset ones from an
    enclosing `subscribing_as`."""
    return OutputPrefs(sample_rate, speak, pace).over(_default_output.get())


class EventStream:
    """One subscriber's view of a session's events, one event at a time.

    Output belongs to the subscriber, not the session: `sample_rate` (its
    audio's rate), `speak` (False: text only, no audio) and `pace` (False:
    the whole reply at once, when no other listener wants real time). Unset
    ones come from an enclosing `subscribing_as`, then the session's config."""

    def __init__(self, actor: ray.actor.ActorHandle, exclusive: str | None = None, *,
                 sample_rate: int | None = None, speak: bool | None = None, pace: bool | None = None) -> None:
        self._gen = actor.events.remote(exclusive, current_output(sample_rate, speak, pace))
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
    """Hosts one session at a time (`host`), then, once it ended, waits as a
    spare to host another (actors/session_ref.py says why). Every session
    call names its session (`session_id`, added by `SessionRef`) and is
    refused with `SessionMoved` unless this actor hosts that session now."""

    def __init__(self) -> None:
        """No argument: Ray builds a worker's serialization context on its
        first one, and a session builds a leaner one first (worker_env.py);
        the config comes with `host`."""
        lean_serialization_context()
        self._config_or_none: AppConfig | None = None
        self._stores = ActorStores()
        self._binds = 0
        """How many sessions this actor has hosted: a spare's timer knows if it was taken."""
        self._channels = ChannelHost(self._serve_channel)
        self._unbind()

    @property
    def _config(self) -> AppConfig:
        if self._config_or_none is None:
            raise RuntimeError("a new session actor is hosted with its config: host(session_id, config)")
        return self._config_or_none

    def _unbind(self) -> None:
        """Forget the session: nothing of it may reach the next one."""
        self._session_id: str | None = None
        self._store: HistoryStore | None = None
        self._core_or_none: SessionCore | None = None
        self._starting = asyncio.Lock()  # binds to the actor's loop on first use (Python >= 3.10)
        self._created = time.time()
        self._owner: str | None = None
        self._memory: Any = None
        self._exclusive: asyncio.Queue[Event] | None = None
        self._vad_prepared = False

    def _check(self, session_id: str) -> None:
        if not session_id or session_id != self._session_id:
            raise SessionMoved(session_id)

    # ------------------------------------------------------------ lifecycle
    async def host(self, session_id: str, config: AppConfig | None = None) -> str:
        """Host `session_id` from now on (a new one, or one brought back from
        the store) and start it, with `config` when given (a spare made by
        one caller may serve another: a notebook with its own providers);
        → the id. Refused with `SessionMoved` when this actor hosts a session
        already, or when another live actor hosts this one (two callers
        bringing it back at once: the first wins)."""
        if self._session_id is not None:
            raise SessionMoved(session_id)
        if config is None and self._config_or_none is None:
            raise ValueError("a new session actor is hosted with its config: host(session_id, config)")
        self._session_id, self._binds = session_id, self._binds + 1
        if config is not None:
            self._config_or_none = config
        if self._binds > 1:
            from actors.providers.adapters.usage import forget_provider_state

            forget_provider_state()  # the last session's breakers and counters are not this one's
        self._created = time.time()
        me = ray.get_runtime_context().current_actor
        directory = None
        try:
            directory = session_directory(self._config)
            winner = await directory.attach.remote(session_id, me)
        except Exception:
            self._unbind()
            asyncio.get_running_loop().create_task(self._retire(directory))
            raise
        if not same_actor(winner, me):
            self._unbind()
            asyncio.get_running_loop().create_task(self._retire(directory))
            raise SessionMoved(session_id)
        await self._ensure_started()
        return session_id

    async def hosting(self) -> str | None:
        """The session hosted now; None for a spare."""
        return self._session_id

    async def _ensure_started(self) -> SessionCore:
        """Build the session from what the store kept, once, in the actor's
        event loop (the store is async and a PostgreSQL pool belongs to one
        loop; `__init__` has none). A warm actor does this in `host()`, long
        before a client arrives. A store that cannot be read raises here,
        and the next call tries again: starting empty would overwrite the
        kept conversation."""
        if self._core_or_none is None:
            async with self._starting:
                if self._core_or_none is None:
                    sid = self._session_id
                    if sid is None:
                        raise SessionMoved("")
                    if self._store is None:
                        self._store = self._stores.history(self._config)
                        self._stores.open_memory_ahead(self._config, sid)
                    stored = await self._store.snapshot(sid) if self._store else StoredSession()
                    if self._session_id != sid:  # ended while the store answered
                        raise SessionMoved(sid)
                    core = build_core(sid, self._config, self._store, stored)
                    self._owner = stored.owner
                    core.start()
                    self._core_or_none = core
                    asyncio.get_running_loop().create_task(self._reap_when_idle(core))
        return self._core_or_none

    @property
    def _core(self) -> SessionCore:
        """The session, for code that runs only after `_ensure_started`."""
        assert self._core_or_none is not None, "session not started"
        return self._core_or_none

    async def _session(self, session_id: str) -> SessionCore:
        """The hosted session, if the call is for it; started if it was not."""
        self._check(session_id)
        return await self._ensure_started()

    # ------------------------------------------------------------ session calls
    async def ready(self, session_id: str = "") -> str:
        return (await self._session(session_id)).session_id

    async def send_audio(self, frames: list[tuple[int | None, bytes]], sample_rate: int = SAMPLE_RATE,
                         stream: str = "", session_id: str = "") -> int:
        """A batch of (sequence number, PCM16 frame); returns frames accepted."""
        core = await self._session(session_id)
        self._prepare_vad(core)
        return core.send_audio(frames, sample_rate, stream)

    def _prepare_vad(self, core: SessionCore) -> None:
        """Load the VAD's model in a thread once someone is there to speak (a
        client claimed the session, or audio came): idle warm and spare actors
        never hold it, and the first speech does not wait for it."""
        if self._vad_prepared:
            return
        self._vad_prepared = True

        def report(done: Any) -> None:
            if done.exception() is not None:
                log.warning("session %s: VAD model not loaded ahead: %r", core.session_id, done.exception())

        asyncio.get_running_loop().run_in_executor(None, core.vad.prepare).add_done_callback(report)

    async def send_text(self, text: str, session_id: str = "") -> int | None:
        return (await self._session(session_id)).send_text(text)

    async def greet(self, session_id: str = "") -> int:
        """A device woke up: say the persona's greeting, as a turn of its own."""
        core = await self._session(session_id)
        return core.say(core.dialogue.persona.greeting_text())

    async def set_persona(self, persona_id: str, session_id: str = "") -> str:
        """Become the persona `persona_id` (checked by the caller against the
        config) from the next turn on, and keep it with the conversation."""
        if not self._config.has_persona(persona_id):
            raise ValueError(f"no persona {persona_id!r}")
        core = await self._session(session_id)
        if core.dialogue.persona.id != persona_id:
            config = persona_config(self._config, self._config.persona(persona_id))
            llm, tts = chained_llm(config), chained_tts(config)
            for chain in (llm.chain, tts.chain):
                chain.notify = core.provider_failover
            core.set_persona(config.persona(), llm, tts)
        if self._store is not None:
            await self._store.set_persona(core.session_id, persona_id)
        return persona_id

    async def utterances(self, settle: bool = False, session_id: str = "") -> int:
        """How many utterances the VAD has opened; with `settle`, after all
        audio sent so far has been through it (so a caller can tell that a
        recording held no speech instead of waiting for a turn)."""
        core = await self._session(session_id)
        if settle:
            await core.audio.drained()
        return core.audio.utterances

    async def interrupt(self, session_id: str = "") -> bool:
        return (await self._session(session_id)).interrupt()

    async def listen(self, state: str, mode: str = "auto", session_id: str = "") -> None:
        (await self._session(session_id)).listen(state, mode)

    async def claim(self, owner: str, session_id: str = "") -> bool:
        """First caller becomes the owner; later callers must be the same
        principal, so a guessed session id does not open someone's session.
        The owner is kept in the store with the conversation, so it outlives
        this actor: whoever names the id after the actor ended is checked
        against the same owner."""
        core = await self._session(session_id)
        if self._owner is None:
            # one conditional write: two replicas racing for this id get the same winner
            self._owner = owner if self._store is None else await self._store.claim(core.session_id, owner)
        if self._owner == owner:
            # a claim is the client arriving: its socket subscribes next, so the
            # orphan clock starts now, not when the actor was made (a warm one)
            core.last_activity = time.monotonic()
            self._prepare_vad(core)
            await self._attach_memory(core)
        return self._owner == owner

    async def _attach_memory(self, core: SessionCore) -> None:
        """The owner's long-term memory, once the owner is known (a claimed
        session; a notebook's unclaimed session has none)."""
        if self._memory is not None or self._owner is None:
            return
        try:
            store = await self._stores.memory(self._config)
        except Exception as e:  # a database that is down must not stop the conversation
            log.warning("session %s: long-term memory unavailable: %s", core.session_id, type(e).__name__)
            return
        if store is None or self._core_or_none is not core:  # memory off, or the session ended meanwhile
            return
        self._memory = store
        core.use_memory(store, self._owner)

    async def touch(self, session_id: str = "") -> None:
        """The warm pool's keep-alive: an unclaimed actor in a live pool is
        not idle; once the pool is gone, it reaps itself after idle_timeout_s."""
        self._check(session_id)
        if self._core_or_none is not None:  # not started yet: its idle clock has not started either
            self._core_or_none.last_activity = time.monotonic()

    async def device_message(self, kind: str, payload: Any, session_id: str = "") -> None:
        (await self._session(session_id)).device_message(kind, payload)

    async def events(self, exclusive: str | None = None, output: OutputPrefs | None = None,
                     session_id: str = "") -> AsyncIterator[list[Event]]:
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
        core = await self._session(session_id)
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

    async def open_channel(self, node_id: str, exclusive: str | None = None, output: OutputPrefs | None = None,
                           session_id: str = "") -> tuple[str, bytes] | None:
        """A same-node data path for one listener (actors/session_channel.py):
        → (socket path, one-time secret), served as `events(exclusive,
        output)` plus the socket's calls; None when the caller runs on
        another node (`node_id`) or this process cannot offer one."""
        await self._session(session_id)
        if node_id != ray.get_runtime_context().get_node_id():
            return None
        return await self._channels.grant((session_id, exclusive, output))

    async def _serve_channel(self, grant: tuple[str, str | None, OutputPrefs | None], channel: ActorChannel) -> None:
        session_id, exclusive, output = grant
        await serve_session_channel(self, session_id, self.events(exclusive, output, session_id=session_id), channel)

    async def history(self, session_id: str = "") -> list[dict[str, Any]]:
        return [m.model_dump() for m in (await self._session(session_id)).history()]

    async def stats(self, session_id: str = "") -> dict[str, Any]:
        import os

        from actors.providers.adapters.usage import provider_report

        core = await self._session(session_id)
        if core.reply_turn is not None:
            state = "replying"
        elif core.audio.in_speech:
            state = "listening"
        else:
            state = "idle"
        return {**core.stats(), "pid": os.getpid(), "created": self._created,
                "device_state": core.device_state, "hosted": self._binds,
                # for the control panel (actors/ingress/admin.py)
                "owner": self._owner, "persona": core.dialogue.persona.id, "state": state,
                "closed": core.closed, "idle_s": round(time.monotonic() - core.last_activity, 1),
                "channels_open": self._channels.open,  # listeners on this node's data path (session_channel.py)
                "node_id": ray.get_runtime_context().get_node_id(),
                # this process's breakers and provider counters: the session's own (one per process)
                "providers": provider_report()}

    async def close(self, forget: bool = False, session_id: str = "") -> None:
        """End the session; `forget` also deletes its stored conversation.
        Listeners get `session.closed` first, which ends their event streams
        (a socket closes normally on it)."""
        core = await self._session(session_id)
        if not core.closed and core.subscribers:
            core.emit_error(ErrorCode.SESSION_CLOSED, "the session was ended")
            await asyncio.sleep(0.05)
        await self._finish(core, forget)

    # ------------------------------------------------------------ ending
    async def _finish(self, core: SessionCore, forget: bool = False) -> None:
        """End `core`'s session (its last save included, then `forget`),
        free its place and go back to the spares (its stores stay open). Once:
        `close()` and the idle reaper may both get here."""
        if self._core_or_none is not core:
            return
        store = self._store
        self._unbind()  # from here on, calls for this session are refused: callers bring it back
        try:
            await core.close()
            if core.subscribers:  # one that joined after the goodbye: its stream must end too, not wait on
                core.emit_error(ErrorCode.SESSION_CLOSED, "the session was ended")
            if store is not None and forget:  # the stores stay open for the next session (actors/session_stores.py)
                await core.forget_history()
        finally:
            directory = None
            with contextlib.suppress(Exception):  # no directory: nothing holds a place or a spare
                directory = session_directory(self._config)
                directory.release.remote(core.session_id, ray.get_runtime_context().current_actor)
            await self._retire(directory)

    async def _retire(self, directory: ray.actor.ActorHandle | None = None) -> None:
        """Wait as a spare if the directory wants one, else exit. `directory`:
        the handle the caller already looked up (each lookup is a blocking
        round trip to Ray's control store on this actor's loop)."""
        binds = self._binds
        try:
            directory = directory or session_directory(self._config)
            context = ray.get_runtime_context()
            kept = await directory.recycle.remote(context.current_actor, context.get_node_id())
        except Exception:
            kept = False
        if not kept:
            ray.actor.exit_actor()
        # once the callers holding the ended session (close(), the reaper) have returned
        asyncio.get_running_loop().call_later(RELEASE_AFTER_S, release_memory)
        asyncio.get_running_loop().create_task(self._exit_if_forgotten(binds))

    async def _exit_if_forgotten(self, binds: int) -> None:
        """A spare waits to be taken for as long as the directory holds it.
        One it no longer holds and that hosts nothing exits: it was taken but
        its taker died before `host`, or a restarted directory kept others."""
        period = max(1.0, self._config.session.idle_timeout_s / 4)
        while self._binds == binds:
            await asyncio.sleep(period)
            if self._binds != binds:
                return
            try:
                held = await session_directory(self._config).holds.remote(ray.get_runtime_context().current_actor)
            except Exception:
                continue  # the directory is restarting: ask again later
            if not held:
                await asyncio.sleep(30.0)  # taken: its host call is on its way
                if self._binds == binds:
                    ray.actor.exit_actor()

    def _idle_limit(self, core: SessionCore) -> float:
        """A claimed session with no client left ends after orphan_timeout_s
        (its conversation is in the store); otherwise after idle_timeout_s."""
        cfg = self._config.session
        if self._owner is not None and core.subscribers == 0:
            return min(cfg.orphan_timeout_s, cfg.idle_timeout_s)
        return cfg.idle_timeout_s

    async def _reap_when_idle(self, core: SessionCore) -> None:
        cfg = self._config.session
        period = max(0.2, min(cfg.idle_timeout_s, cfg.orphan_timeout_s, 120.0) / 4)
        while not core.closed:
            await asyncio.sleep(period)
            if self._core_or_none is not core:
                return  # ended by close()
            idle = time.monotonic() - core.last_activity
            if idle >= self._idle_limit(core) and core.subscribers == 0 and core.reply_turn is None:
                log.info("session %s idle for %.0f s; ending", core.session_id, idle)
                break
        # idle, or ended from inside (the end_conversation tool): free the place and the process
        await self._finish(core)
