"""What both clients share: the socket's life (reconnect, goodbye,
refusals and their retry hints), a turn as the client saw it, and
real-time streaming of 60 ms frames."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from actors.audio import silence, split_frames

FRAME_MS = 60
RESTARTED = "session.restarted"
"""The `error` code the server sends when it reopened a dead session on this socket."""
GOODBYE = "goodbye"
"""The message a draining server sends before it closes with SERVICE_RESTART."""
SERVICE_RESTART = 1012
"""WebSocket close code "service restart": reconnect (after `retry_after_ms`) and resume."""


class _Refusal(ConnectionError):
    """The server answered a socket with `reply` instead of `hello`."""

    def __init__(self, what: str, reply: dict[str, Any]) -> None:
        super().__init__(f"{what}: {reply}")
        self.reply = reply

    @property
    def retry_after_s(self) -> float:
        """The server's hint of when to come back (0 without one)."""
        return _retry_after_s(self.reply)


class ServerRestarting(_Refusal):
    """The server answered a new socket with `goodbye`: the replica it reached
    is shutting down; try again shortly (another one will take it)."""

    def __init__(self, goodbye: dict[str, Any]) -> None:
        super().__init__("server restarting", goodbye)
        self.goodbye = goodbye


class ServerBusy(_Refusal):
    """The server refused a new socket for now (`limit.starting_sessions`:
    as many new sessions as it starts at once wait already), with a hint of
    when to come back; nothing of the session exists yet."""

    BUSY_CODES = frozenset({"limit.starting_sessions"})

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__("server busy", error)


class HelloRefused(_Refusal):
    """The server answered our hello with an error (a session cap, a session
    that is not ours): trying again would get the same answer."""

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__("server refused hello", error)


def refused_hello(reply: dict[str, Any]) -> ConnectionError:
    """What a reply other than `hello` to our hello means."""
    if reply.get("type") == GOODBYE:
        return ServerRestarting(reply)
    if reply.get("type") == "error" and reply.get("code") in ServerBusy.BUSY_CODES:
        return ServerBusy(reply)
    return HelloRefused(reply)


def closed_for_restart(error: BaseException) -> bool:
    """Did the server close this socket because it is restarting (1012)?"""
    return (isinstance(error, ServerRestarting) or
            isinstance(error, ConnectionClosed) and error.rcvd is not None and error.rcvd.code == SERVICE_RESTART)


def _retry_after_s(message: dict[str, Any] | None) -> float:
    """The server's reconnect hint (a `goodbye`'s or a refusal's), bounded so
    a bad value cannot stall us."""
    value = message.get("retry_after_ms") if message else None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 30_000:
        return value / 1000
    return 0.0


def should_reconnect(error: BaseException) -> bool:
    """Is this socket failure one to answer by reconnecting? Yes for a
    dropped connection, a server that is (re)starting (1012 after a
    `goodbye`: an upgrade) or busy starting sessions; no for a refusal (an
    `error` in answer to hello, close codes 4400–4499: auth, a session that
    is not yours, limits) or a normal close (1000: the conversation ended)."""
    if isinstance(error, (ServerRestarting, ServerBusy)):
        return True
    if isinstance(error, HelloRefused):
        return False
    if isinstance(error, ConnectionClosed):
        frame = error.rcvd
        return frame is None or not (frame.code == 1000 or 4400 <= frame.code < 4500)
    if isinstance(error, InvalidStatus):
        return error.response.status_code >= 500
    return isinstance(error, (OSError, InvalidHandshake, asyncio.TimeoutError, ConnectionError))


@dataclass
class ClientTurn:
    """What one turn looked like from the client's side of the socket."""

    transcript: str | None = None
    partials: list[str] = field(default_factory=list)
    reply: str = ""
    sentences: list[str] = field(default_factory=list)
    audio: bytes = b""
    sample_rate: int = 16000
    messages: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    interrupted: bool = False
    first_audio_at: float | None = None
    audio_done_at: float | None = None
    speech_sent_at: float | None = None
    """When the last frame of speech (before the trailing silence) was sent."""

    @property
    def end_of_speech_to_first_audio_ms(self) -> float | None:
        if self.first_audio_at is None or self.speech_sent_at is None:
            return None
        return (self.first_audio_at - self.speech_sent_at) * 1000.0


OnEvent = Callable[[dict[str, Any]], None]
C = TypeVar("C")


def server_busy(error: BaseException) -> bool:
    """A first connect's only reason to try again: the server said when."""
    return isinstance(error, ServerBusy)


async def connect_patiently(open_socket: Callable[[], Awaitable[C]], timeout_s: float = 60.0,
                            first_wait_s: float = 0.0,
                            retry: Callable[[BaseException], bool] = should_reconnect) -> C:
    """`open_socket()` until it succeeds, retrying what `retry` allows
    (`should_reconnect`: unreachable, restarting, busy; a first connect
    passes `server_busy`, so a wrong address fails at once) with jittered
    backoff, each wait at least the server's hint, until `timeout_s`; a
    refusal is raised at once."""
    deadline = time.monotonic() + timeout_s
    if first_wait_s:
        await asyncio.sleep(min(first_wait_s, max(0.0, deadline - time.monotonic())))
    delay = 0.2
    while True:
        try:
            return await asyncio.wait_for(open_socket(), max(1.0, deadline - time.monotonic()))
        except Exception as e:
            if not retry(e) or time.monotonic() + delay >= deadline:
                raise
            hint = e.retry_after_s if isinstance(e, _Refusal) else 0.0
            await asyncio.sleep(max(delay, hint) * random.uniform(0.8, 1.2))
            delay = min(2.0, delay * 2)


class ClientBase:
    """One socket to one session; the protocols differ only in their hello,
    their audio frames and how they read a turn (`native.py`, `xiaozhi.py`)."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.hello: dict[str, Any] = {}
        self.reconnects = 0
        self.goodbye: dict[str, Any] | None = None
        """The server's last `goodbye` on this socket (it is restarting), if any."""
        self._connect_args: dict[str, Any] = {}
        self.audio_sent_ms = 0
        """Audio this client has sent, in ms: the session's `stream_ms` clock
        (its events say where in the stream they happened), if it sent all of
        the session's audio."""

    async def _connect_again(self) -> ClientBase:
        raise NotImplementedError

    async def reconnect(self, timeout_s: float = 60.0) -> None:
        """Open a new socket to the same session (the native client names its
        session id; a xiaozhi device gets its own session back by its
        credentials), retrying with jittered backoff while the server is
        unreachable or starting, until `timeout_s`. After a `goodbye` the
        first try waits its `retry_after_ms`, so a drained replica's clients
        spread out. A refusal (auth, not your session) is raised at once. The
        old socket is dropped."""
        fresh = await connect_patiently(self._connect_again, timeout_s, first_wait_s=_retry_after_s(self.goodbye))
        old, self.ws = self.ws, fresh.ws
        self.hello = fresh.hello
        self.goodbye = None
        self._adopt(fresh)
        self.reconnects += 1
        try:
            await old.close()
        except Exception:  # it is dead already
            pass

    def _adopt(self, fresh: Any) -> None:
        """Take the new connection's per-socket state (codecs, ids)."""

    async def close(self) -> None:
        await self.ws.close()

    async def __aenter__(self) -> ClientBase:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def stream_pcm(self, pcm16: bytes, realtime: bool = True, trailing_silence_ms: int = 1200,
                         turn: ClientTurn | None = None, lags_ms: list[float] | None = None,
                         sent: list[tuple[int, float]] | None = None) -> None:
        """Send speech as 60 ms frames, in real time unless told otherwise;
        `lags_ms` collects how late each frame left against its schedule,
        `sent` (`audio_sent_ms` after the frame, when it left) for each frame."""
        frames = split_frames(pcm16, FRAME_MS)
        tail = split_frames(silence(trailing_silence_ms), FRAME_MS)
        start = time.monotonic()
        for i, frame in enumerate(frames + tail):
            if i == len(frames) and turn is not None:
                turn.speech_sent_at = time.monotonic()
            if lags_ms is not None:
                lags_ms.append(max(0.0, (time.monotonic() - (start + i * FRAME_MS / 1000)) * 1000))
            await self._send_audio_frame(frame)
            self.audio_sent_ms += len(frame) * 1000 // (2 * 16000)
            if sent is not None:
                sent.append((self.audio_sent_ms, time.monotonic()))
            if realtime:
                delay = start + (i + 1) * FRAME_MS / 1000 - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)

    async def _send_audio_frame(self, frame: bytes) -> None:
        raise NotImplementedError
