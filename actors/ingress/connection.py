"""One client socket bridged to one session actor, whatever the protocol.

Uplink: client frames → protocol adapter → actions; audio is gathered into
batches of `ingress.uplink_batch_ms` (DESIGN §2: every cross-process call
costs 0.7–2.5 ms of CPU) and every call to the session is awaited in order,
so control messages never overtake the audio sent before them.
Downlink: the session's event stream → adapter → client frames.

When the session actor dies under a live socket (killed, crashed, its node
lost), the socket stays open: the connection reopens the same session id
through the same opener (ownership and caps checked again; the conversation
comes back from the store), subscribes again and tells the client with an
`error` event `session.restarted` (docs/architecture.md, "When parts die").

When the ingress replica itself is shut down (a redeploy, a scale-down;
actors/ingress/drain.py), `request_drain` makes the connection let the reply
in flight finish within a grace, or cut it as a barge-in would (what was
heard is kept in the history), then send `goodbye` and close with 1012. The
session actor is left running: the client resumes it on another replica.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any, Protocol

import ray

from actors.config import AppConfig
from actors.events import ErrorCode, ErrorEvent, TTSStop
from actors.ingress.limits import LimitError, RateLimiter, check_size
from actors.protocols.base import (
    Audio,
    DeviceMessage,
    Greet,
    Hello,
    HistoryRequest,
    Interrupt,
    Listen,
    Outgoing,
    ProtocolAdapter,
    ProtocolError,
    Reply,
    Text,
)
from actors.session_link import SessionLink
from actors.session_ref import StartingSession

log = logging.getLogger(__name__)

HELLO_TIMEOUT_S = 10.0
DRAIN_CUT_WAIT_S = 1.5
"""After a drain cuts the reply in flight, how long the connection waits for
the cut's `tts.stop` / `metrics` to reach the client before it says goodbye."""
TURN_EVENTS = frozenset({"stt.final", "llm.delta", "llm.emotion", "tool.call", "tool.result", "tts.start",
                         "tts.sentence", "tts.audio_end"})
"""Events that show a turn's reply under way; its `metrics` event ends it."""
REOPEN_TIMEOUT_S = 30.0
"""How long a connection tries to bring its dead session back (or waits for
a session starting on a new actor after its hello) before it gives up and
closes the socket (1011 `internal`; clients reconnect)."""


class ClientSocket(Protocol):
    """The few WebSocket calls the bridge needs (Starlette's WebSocket fits)."""

    async def receive(self) -> dict[str, Any]: ...
    async def send_text(self, data: str) -> None: ...
    async def send_bytes(self, data: bytes) -> None: ...
    async def close(self, code: int = 1000, reason: str | None = None) -> None: ...


class SessionOpener(Protocol):
    async def __call__(self, session_id: str | None, persona: str | None = None) -> tuple[str, Any, bool]:
        """→ (session id, actor handle, resumed); the handle may be a
        `StartingSession`, awaited after the hello is sent."""


class ConnectionClosed(Exception):
    pass


class VoiceConnection:
    def __init__(self, ws: ClientSocket, adapter: ProtocolAdapter, open_session: SessionOpener,
                 config: AppConfig, observe: Any = None, exclusive: bool = False,
                 hello_in_flight: Callable[[], Callable[[], None]] | None = None) -> None:
        self._ws = ws
        self._hello_in_flight = hello_in_flight or (lambda: lambda: None)
        """Called when the client's hello arrives; what it returns, once the answer is
        out: new actors' boots wait for the hellos being answered (session_manager.py).
        A client that has not said hello yet holds nothing back."""
        self._hello_out: Callable[[], None] = lambda: None
        self._exclusive = exclusive
        self._last_traffic = time.monotonic()
        self._adapter = adapter
        self._open_session = open_session
        self._config = config
        self._observe = observe or (lambda event: None)
        self._calls: asyncio.Queue[tuple[str, tuple[Any, ...]] | None] = asyncio.Queue()
        self._pending = bytearray()
        self._pending_since: float | None = None
        self._seq = 0
        self._stream = uuid.uuid4().hex
        self._send_lock = asyncio.Lock()
        self._frame_limit = RateLimiter(config.limits.ws_messages_per_second * 60,
                                        burst=max(10, int(config.limits.ws_messages_per_second)))
        self.session_id: str | None = None
        self.actor: Any = None
        self._rate = config.session.output_sample_rate
        self._events: SessionLink | None = None
        self._generation = 0
        """Counts session actors this socket has had: one more per reopen."""
        self._recover_lock = asyncio.Lock()
        self._closed = False
        self._last_turn = 0
        self._replying: int | None = None
        """The turn whose `tts.start` the client got and whose `tts.stop` it has not."""
        self._open_turn: int | None = None
        """The turn whose reply is under way (its events seen, its `metrics` not yet)."""
        self._done_turn = 0
        self._in_utterance = False
        """Between the session's `vad.speech_start` and `vad.speech_end`: the
        end of speech is being decided, so audio goes out a frame at a time."""
        self._turn_idle = asyncio.Event()
        self._turn_idle.set()
        self._drain_requested = asyncio.Event()
        self._drain: tuple[float, int] = (0.0, 0)
        """(grace in seconds, retry_after_ms) of a requested drain."""
        self.drained_with: str | None = None
        """How a drain ended this socket: "idle", "finished" or "cut" (for logs and tests)."""

    # ------------------------------------------------------------ plumbing
    async def _send(self, frames: list[Outgoing]) -> None:
        self._last_traffic = time.monotonic()
        async with self._send_lock:
            for f in frames:
                if isinstance(f, bytes):
                    await self._ws.send_bytes(f)
                else:
                    await self._ws.send_text(f)

    async def _receive(self) -> str | bytes:
        msg = await self._ws.receive()
        self._last_traffic = time.monotonic()
        if msg["type"] == "websocket.disconnect":
            raise ConnectionClosed()
        if msg.get("bytes") is not None:
            return msg["bytes"]
        return msg.get("text") or ""

    def _check_size(self, data: str | bytes) -> None:
        check_size(len(data), self._config.limits.max_ws_message_bytes, "message")

    # ------------------------------------------------------------ lifecycle
    async def serve(self) -> None:
        try:
            await self._serve()
        finally:
            self._hello_out()  # ended before its hello went out: nothing waits for it any longer

    async def _serve(self) -> None:
        try:
            hello, rest = await asyncio.wait_for(self._await_hello(), HELLO_TIMEOUT_S)
        except asyncio.TimeoutError:
            await self._ws.close(4408, "protocol.hello_timeout")
            return
        except ConnectionClosed:
            return
        except (ProtocolError, LimitError) as e:
            await self._send(self._adapter.error(e.code, e.message))
            await self._ws.close(e.close_code if isinstance(e, ProtocolError) else e.ws_close_code, e.code)
            return
        self._hello_out = self._hello_in_flight()
        sid, actor, resumed = await self._open_session(hello.session_id, hello.persona)
        self.session_id = sid
        rate = self._rate = self._adapter.wants_output_rate or self._config.session.output_sample_rate
        starting = isinstance(actor, StartingSession)
        subscribed: list[SessionLink] = []
        if starting:  # a new actor is starting (seconds in a burst): hello now, the client's audio waits unread
            async def subscribe(ref: Any) -> None:  # part of the start: the client's other calls wait for it
                stream = self._subscribe(ref)
                subscribed.append(stream)
                await stream.__anext__()

            actor = actor.then(subscribe)
            await self._say_hello(sid, resumed, rate)
            try:
                actor = await asyncio.wait_for(actor, REOPEN_TIMEOUT_S)
            except asyncio.TimeoutError:
                self._events = subscribed[0] if subscribed else None  # closed by _give_up
                try:
                    await self._give_up(ErrorCode.INTERNAL, "the session could not be started in time", 1011)
                except ConnectionClosed:
                    return
        self.actor = actor
        if subscribed:
            self._events = subscribed[0]
        else:
            # hello as soon as the subscription is asked for; the client's input
            # waits (unread) until it is in place, so nothing said is lost
            events = self._events = self._subscribe(actor)
            await self._say_hello(sid, resumed, rate)
            try:
                await events.__anext__()  # session.started: subscribed
            except ray.exceptions.RayActorError:  # died between the claim and the subscription
                try:
                    await self._recover(self._generation)
                except ConnectionClosed:
                    return
        if hello.greet and not resumed:
            await actor.greet.remote()
        for action in rest:
            await self._dispatch(action)
        caller = asyncio.create_task(self._caller())
        tasks = [asyncio.create_task(self._downlink()), asyncio.create_task(self._uplink()),
                 asyncio.create_task(self._flusher()), asyncio.create_task(self._idle_watch()),
                 asyncio.create_task(self._drainer()), caller]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t.exception() and not isinstance(t.exception(), ConnectionClosed):
                    log.warning("connection %s ended: %r", sid, t.exception())
        finally:
            self._closed = True  # a session dying from here on is not reopened
            for t in tasks[:-1]:
                t.cancel()
            # what the client sent before leaving still reaches the session
            self._flush()
            self._calls.put_nowait(None)
            try:
                await asyncio.wait_for(caller, 5.0)
            except (asyncio.TimeoutError, Exception):
                caller.cancel()
            self._events.close()

    async def _say_hello(self, sid: str, resumed: bool, rate: int) -> None:
        """The hello reply (the hello no longer holds new actors back once it
        is out), then what the protocol sends right after it."""
        await self._send(self._adapter.hello_reply(sid, resumed, rate))
        self._hello_out()
        await self._send(self._adapter.after_hello())

    def _subscribe(self, actor: Any) -> SessionLink:
        return SessionLink(actor, exclusive=self._stream if self._exclusive else None,
                           sample_rate=self._rate, speak=self._adapter.speaks,  # this socket's output only
                           use_channel=self._config.ingress.session_channel)

    async def _call(self, method: str, *args: Any) -> Any:
        """A call to the session; if its actor is dead, once more on the
        reopened one (input the dead actor got died with it, so a retry
        cannot count twice). None if it failed twice or the socket is closing."""
        for attempt in (1, 2):
            generation, link = self._generation, self._events
            try:
                if link is None:
                    return await getattr(self.actor, method).remote(*args)
                return await link.call(method, *args)
            except ray.exceptions.RayActorError:
                if self._closed or attempt == 2:
                    log.warning("connection %s: %s lost (session actor dead)", self.session_id, method)
                    return None
                await self._recover(generation)
        return None

    async def _recover(self, generation: int) -> None:
        """The session actor of `generation` died: reopen the same session
        id through the opener (the same owner checks as a reconnect; the
        conversation comes back from the store), subscribe again, and tell
        the client: `session.restarted` carrying the lost turn's id, then
        `tts.stop` if a reply was playing. No-op if another task already did.
        Raises ConnectionClosed (after closing the socket) if it cannot."""
        async with self._recover_lock:
            if self._closed:
                raise ConnectionClosed()
            if generation != self._generation:
                return  # the uplink or the downlink got there first
            log.warning("connection %s: session actor died; reopening it", self.session_id)
            deadline = time.monotonic() + REOPEN_TIMEOUT_S
            delay = 0.1
            while True:
                try:
                    sid, actor, _ = await self._open_session(self.session_id, None)
                    if isinstance(actor, StartingSession):
                        actor = await actor
                    events = self._subscribe(actor)
                    await asyncio.wait_for(events.__anext__(), max(1.0, deadline - time.monotonic()))
                    break
                except (ray.exceptions.RayActorError, asyncio.TimeoutError) as e:
                    # its name may outlive it for a moment: ask again
                    if time.monotonic() + delay >= deadline:
                        await self._give_up(ErrorCode.INTERNAL, f"the session could not be reopened: "
                                                                f"{type(e).__name__}", 1011)
                except Exception as e:  # refused (no longer yours, caps): as a reconnect would be
                    code = getattr(e, "code", ErrorCode.INTERNAL)
                    await self._give_up(code, getattr(e, "message", "the session could not be reopened"),
                                        getattr(e, "ws_close_code", 1011))
                await asyncio.sleep(delay)
                delay = min(1.0, delay * 2)
            with_suppress_close(self._events)
            lost, replying = self._last_turn, self._replying
            self.session_id, self.actor, self._events = sid, actor, events
            self._generation += 1
            self._last_turn, self._replying = 0, None  # the new actor counts turns afresh
            self._open_turn, self._done_turn, self._in_utterance = None, 0, False
            self._turn_idle.set()
            frames = self._adapter.encode(ErrorEvent(
                session_id=sid, turn_id=lost, code=ErrorCode.SESSION_RESTARTED,
                message="the session restarted; the turn in flight was lost, the conversation before it kept"))
            if replying is not None:
                frames += self._adapter.encode(TTSStop(session_id=sid, turn_id=replying, reason="interrupted"))
            await self._send(frames)

    async def _give_up(self, code: str, message: str, close_code: int) -> None:
        with_suppress_close(self._events)
        try:
            await self._send(self._adapter.error(str(code), message))
            await self._ws.close(close_code, str(code))
        except Exception:  # the client is gone already
            pass
        raise ConnectionClosed()

    async def _await_hello(self) -> tuple[Hello, list[Any]]:
        """The hello, and whatever else its message asked for (text stream)."""
        while True:
            data = await self._receive()
            self._check_size(data)
            actions = self._adapter.on_binary(data) if isinstance(data, bytes) else self._adapter.on_text(data)
            for i, action in enumerate(actions):
                if isinstance(action, Hello):
                    return action, actions[i + 1:]

    async def _uplink(self) -> None:
        while True:
            data = await self._receive()
            try:
                self._frame_limit.check("socket")
                self._check_size(data)
                actions = self._adapter.on_binary(data) if isinstance(data, bytes) else self._adapter.on_text(data)
            except LimitError as e:
                await self._send(self._adapter.error(e.code, e.message))
                continue
            except ProtocolError as e:
                await self._send(self._adapter.error(e.code, e.message))
                if e.fatal:
                    await self._ws.close(e.close_code, e.code)
                    raise ConnectionClosed() from None
                continue
            for action in actions:
                await self._dispatch(action)

    async def _dispatch(self, action: Any) -> None:
        if isinstance(action, Audio):
            self._pending.extend(action.pcm16)
            if self._pending_since is None:
                self._pending_since = time.monotonic()
            if len(self._pending) >= self._batch_bytes or self._in_utterance:
                self._flush()
            return
        self._flush()  # control follows the audio sent before it
        if isinstance(action, Text):
            self._calls.put_nowait(("send_text", (action.text,)))
        elif isinstance(action, Interrupt):
            self._calls.put_nowait(("interrupt", ()))
        elif isinstance(action, Listen):
            self._calls.put_nowait(("listen", (action.state, action.mode)))
        elif isinstance(action, Greet):
            self._calls.put_nowait(("greet", ()))
        elif isinstance(action, DeviceMessage):
            self._calls.put_nowait(("device_message", (action.kind, action.payload)))
        elif isinstance(action, HistoryRequest):
            history = await self._call("history") or []
            await self._send([json.dumps({"type": "history", "messages": history})])
        elif isinstance(action, Reply):
            await self._send([action.data])

    @property
    def _batch_bytes(self) -> int:
        return 16000 * 2 * self._config.ingress.uplink_batch_ms // 1000

    def _flush(self) -> None:
        if not self._pending:
            return
        frame_bytes = 16000 * 2 * 60 // 1000  # numbered in 60 ms frames
        pcm = bytes(self._pending)
        frames = []
        for i in range(0, len(pcm), frame_bytes):
            frames.append((self._seq, pcm[i:i + frame_bytes]))
            self._seq += 1
        self._pending.clear()
        self._pending_since = None
        self._calls.put_nowait(("send_audio", (frames, 16000, self._stream)))

    async def _flusher(self) -> None:
        """Do not let the tail of an utterance wait for a full batch."""
        period = self._config.ingress.uplink_batch_ms / 1000
        while True:
            await asyncio.sleep(period)
            if self._pending_since is not None and time.monotonic() - self._pending_since >= period:
                self._flush()

    async def _caller(self) -> None:
        while (call := await self._calls.get()) is not None:
            method, args = call
            await self._call(method, *args)

    async def _downlink(self) -> None:
        while True:
            events, generation = self._events, self._generation
            assert events is not None
            try:
                async for event in events:
                    self._observe(event)
                    frames = self._adapter.encode(event)
                    if frames:
                        await self._send(frames)
                    self._track(event)
                    if getattr(event, "code", None) in ("session.replaced", "session.closed"):
                        self._closed = True  # ended on purpose: its actor's death is not a crash to undo
                        if event.code == "session.replaced":
                            await self._ws.close(4409, "session.replaced")
                        else:
                            await self._session_ended()
                        raise ConnectionClosed()
                return
            except ray.exceptions.RayActorError:  # the session actor died: bring it back on this socket
                await self._recover(generation)

    def _track(self, event: Any) -> None:
        """What the client has been told of the current turn, for a restart
        (the last turn, the one playing) and for a drain (the one under way)."""
        self._last_turn = max(self._last_turn, event.turn_id)
        if event.type == "vad.speech_start":
            self._in_utterance = True
        elif event.type in ("vad.speech_end", "stt.final", "metrics"):
            self._in_utterance = False
        if event.type == "tts.start":
            self._replying = event.turn_id
        elif event.type == "tts.stop" and event.turn_id == self._replying:
            self._replying = None
        if event.type in TURN_EVENTS and event.turn_id > self._done_turn:
            self._open_turn = max(self._open_turn or 0, event.turn_id)
            self._turn_idle.clear()
        elif event.type == "metrics":
            self._done_turn = max(self._done_turn, event.turn_id)
            if self._open_turn is not None and self._open_turn <= self._done_turn:
                self._open_turn = None
                self._turn_idle.set()

    # ------------------------------------------------------------ drain (replica shutting down)
    def request_drain(self, grace_s: float, retry_after_ms: int) -> None:
        """The replica is going away: finish or cut the reply in flight
        within `grace_s`, say goodbye, close 1012 (see `_drainer`). Called
        from the replica's loop; returns at once."""
        if not self._drain_requested.is_set():
            self._drain = (grace_s, retry_after_ms)
            self._drain_requested.set()

    async def _reply_in_flight(self) -> bool:
        """Is a reply under way for this session? What this socket has seen,
        else the session's own word (a typed turn whose first event has not
        arrived yet)."""
        if self._open_turn is not None:
            return True
        try:
            stats = await asyncio.wait_for(self.actor.stats.remote(), 2.0)
        except Exception:  # dead or slow: nothing to wait for here
            return False
        turn = stats.get("reply_turn")
        if turn is None or turn <= self._done_turn:
            return False
        self._open_turn = turn
        self._turn_idle.clear()
        return True

    async def _drainer(self) -> None:
        """Wait for a drain request, then end this socket the restart way.

        The reply in flight may finish within the grace; one still going at
        its end is cut with the session's interrupt, the barge-in primitive,
        so the history keeps what the listener heard and the client gets the
        cut turn's `tts.stop` (`interrupted`) and `metrics` first. Then
        `goodbye` in the protocol's shape and close 1012. The session actor
        is not ended or released: its owner resumes it elsewhere."""
        await self._drain_requested.wait()
        grace_s, retry_after_ms = self._drain
        deadline = time.monotonic() + grace_s
        outcome = "idle"
        while await self._reply_in_flight():
            left = deadline - time.monotonic()
            if left <= 0:
                # False: the reply had ended but for its playback tail; its `metrics` follows
                outcome = "cut" if await self._call("interrupt") else "finished"
                try:
                    await asyncio.wait_for(self._turn_idle.wait(), DRAIN_CUT_WAIT_S)
                except asyncio.TimeoutError:
                    pass
                break
            outcome = "finished"
            try:
                await asyncio.wait_for(self._turn_idle.wait(), left)
            except asyncio.TimeoutError:
                pass
        self._closed = True  # from here the session's death is nobody's to undo on this socket
        self.drained_with = outcome
        from actors.ingress.drain import CLOSE_CODE, REASON

        log.info("connection %s drained (%s); closing %d", self.session_id, outcome, CLOSE_CODE)
        try:
            await self._send(self._adapter.goodbye(self.session_id, REASON, retry_after_ms))
            await self._ws.close(CLOSE_CODE, REASON)
        except Exception:  # the client left on its own meanwhile
            pass
        raise ConnectionClosed()

    async def _session_ended(self) -> None:
        """The session ended itself (`end_conversation`, after its goodbye was
        spoken): a normal close tells the device the conversation is over, and
        the actor, whose core has stopped, is ended so a later connection gets
        a fresh one (its stored conversation stays)."""
        await self._ws.close(1000, "session.closed")
        try:
            await self.actor.close.remote()
        except Exception:  # the actor exits while answering, or is gone already
            pass

    async def _idle_watch(self) -> None:
        """Close a socket on which nothing has passed either way for
        `limits.socket_idle_timeout_s`: a listening device streams audio and
        a speaking session streams replies, so only an abandoned or hostile
        socket is ever idle this long."""
        limit = self._config.limits.socket_idle_timeout_s
        while True:
            left = self._last_traffic + limit - time.monotonic()
            if left <= 0:
                await self._send(self._adapter.error("protocol.idle_timeout",
                                                     f"nothing sent or received for {limit:.0f} s"))
                await self._ws.close(4408, "protocol.idle_timeout")
                raise ConnectionClosed()
            await asyncio.sleep(min(left + 0.05, 30.0))


def with_suppress_close(events: SessionLink | None) -> None:
    """Close a dead actor's stream; cancelling it may itself fail."""
    if events is not None:
        try:
            events.close()
        except Exception:
            pass
