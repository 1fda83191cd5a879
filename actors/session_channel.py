"""A same-node data path between a client's socket and its session actor.

Every frame batch in and every event batch out used to be a Ray call or a
streamed item: measured (`python -m bench.ray_costs`), 1.2–1.9 ms of CPU a
message in the session actor, against 0.16–0.26 ms for the same bytes over
a plain socket, and ~85 % of a live session actor's CPU went to the two
threads Ray's call path runs on. That per-message cost capped density.

So a connection (the device gateway, an ingress replica) whose session
actor runs on its own node asks the actor once, through Ray, for a channel
(`SessionActor.open_channel`), and then speaks to it over a Unix socket:
its calls (audio batches, text, listen, abort, ...) and the session's
event stream. Ray stays the control plane: finding, starting and ending
sessions; a session on another node is reached through Ray as before
(`EventStream`), and so is everything that is not a socket's hot path.

The channel behaves as the Ray path does, so the connection has one code
path: calls are answered in order, with the actor's own exceptions
(`SessionMoved` once the session ended); the event stream starts with
`session.started` and ends when the session's does; when the actor's
process dies the socket closes and every pending call and the stream raise
`RayActorError`, which the connection already answers by reopening the
session. This module is the wire and the actor's side; the connection's is
actors/session_link.py, on actors/channel_client.py. Provider pools offer
the same channels for their calls (actors/pool_channel.py).

Who may connect: the socket lives in a directory only this user can enter
(checked, not assumed), and each channel is granted by a one-time secret
that only the Ray call returns, for one session and one listener, used
within `GRANT_TTL_S`. Frames are pickles, as Ray's own messages between
these two processes are; each side caps a frame's size before reading it.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import pickle
import secrets
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from ray.exceptions import RayActorError

from actors.private_dir import private_dir

log = logging.getLogger(__name__)

GRANT_TTL_S = 10.0
"""A granted channel must be connected within this long."""
MAX_GRANTS = 64
"""Grants not yet shown, per process; past it the oldest lapses."""
MAX_CALL_BYTES = 16 << 20
"""The largest call the actor reads (an audio batch is a few KB; the
socket's own message cap is far below this)."""
CALLS = frozenset({"send_audio", "send_text", "interrupt", "listen", "greet", "device_message", "history",
                   "stats"})
"""What a channel may call: a socket's traffic, nothing that starts, moves or ends a session."""

HEAD = struct.Struct(">IB")
GRANT, CALL = b"G"[0], b"C"[0]  # connection → actor
EVENTS, END, FAILED, REPLY = b"E"[0], b"Z"[0], b"X"[0], b"R"[0]  # actor → connection


class ChannelClosed(RayActorError):
    """The channel's socket closed under a call or the event stream: the
    actor's process died (or is exiting), as a `RayActorError` from Ray
    would say."""

    def __init__(self, detail: str = "") -> None:
        super().__init__(error_msg=f"session channel closed{': ' + detail if detail else ''}")
        self.detail = detail

    def __reduce__(self) -> tuple[Any, ...]:
        return (ChannelClosed, (self.detail,))


def frame(kind: int, payload: bytes) -> bytes:
    return HEAD.pack(len(payload), kind) + payload


async def read_frame(reader: asyncio.StreamReader, limit: int) -> tuple[int, bytes]:
    size, kind = HEAD.unpack(await reader.readexactly(HEAD.size))
    if size > limit:
        raise ValueError(f"channel frame of {size} bytes, over the {limit}-byte cap")
    return kind, await reader.readexactly(size)


def dumps(value: Any) -> bytes:
    return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


def _picklable(error: BaseException) -> BaseException:
    """`error`, or what it was as a RuntimeError if it does not pickle."""
    try:
        pickle.dumps(error)
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


# ---------------------------------------------------------------- actor side
def _sweep(directory: Path) -> None:
    """Sockets of processes that died without cleaning up (killed): a
    server up for days starts thousands of session actors."""
    for sock in directory.glob("*.sock"):
        with contextlib.suppress(ValueError, OSError):
            pid = int(sock.stem)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                sock.unlink()


ChannelHandler = Callable[[Any, "ActorChannel"], Awaitable[None]]


class ChannelHost:
    """The actor's side: one Unix socket a process, listening from the first
    grant on; hands each connection that shows a live grant to `handler`."""

    def __init__(self, handler: ChannelHandler) -> None:
        self._handler = handler
        self._grants: dict[bytes, tuple[float, Any]] = {}
        self._server: asyncio.AbstractServer | None = None
        self._path: str | None = None
        self._starting = asyncio.Lock()
        self.open = 0
        """Channels being served now (in the session's stats)."""

    async def grant(self, grant: Any) -> tuple[str, bytes] | None:
        """A channel for `grant` (what the handler will serve): → (socket
        path, one-time secret), or None if this process cannot offer one."""
        if self._server is None:
            async with self._starting:
                if self._server is None and not await self._listen():
                    return None
        now = time.monotonic()
        for token, (expires, _) in list(self._grants.items()):
            if expires < now:
                del self._grants[token]
        while len(self._grants) >= MAX_GRANTS:
            del self._grants[next(iter(self._grants))]  # dicts keep insertion order: the oldest
        token = secrets.token_bytes(32)
        self._grants[token] = (now + GRANT_TTL_S, grant)
        assert self._path is not None
        return self._path, token

    async def _listen(self) -> bool:
        directory = private_dir("session channels")
        if directory is None:
            return False
        _sweep(directory)
        path = directory / f"{os.getpid()}.sock"
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=str(path))
        except OSError as e:
            log.warning("session channels off: cannot listen on %s: %r", path, e)
            return False
        os.chmod(path, 0o600)
        self._path = str(path)
        atexit.register(_unlink_quietly, str(path))
        return True

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            kind, token = await asyncio.wait_for(read_frame(reader, 64), GRANT_TTL_S)
            entry = self._grants.pop(token, None) if kind == GRANT else None
            if entry is None or entry[0] < time.monotonic():
                log.warning("session channel refused: no live grant shown")
                return
            self.open += 1
            try:
                await self._handler(entry[1], ActorChannel(reader, writer))
            finally:
                self.open -= 1
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


class ActorChannel:
    """One connection as the actor's handler sees it: calls in, events and
    replies out. Whole frames are written at once, so the event task and the
    call loop never interleave bytes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer

    async def next_call(self) -> tuple[int, str, tuple[Any, ...]] | None:
        """(call id, method, args); None once the connection left."""
        try:
            kind, payload = await read_frame(self._reader, MAX_CALL_BYTES)
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        if kind != CALL:
            raise ValueError(f"unexpected channel frame {kind!r}")
        call_id, method, args = pickle.loads(payload)
        return int(call_id), str(method), tuple(args)

    async def calls(self, allowed: frozenset[str], what: str) -> AsyncIterator[tuple[int, str, tuple[Any, ...]]]:
        """The calls of `allowed` methods until the connection leaves; any
        other is answered with a ValueError (not `what`) and skipped."""
        while (call := await self.next_call()) is not None:
            if call[1] in allowed:
                yield call
            else:
                await self.reply(call[0], error=ValueError(f"{call[1]!r} is not {what}"))

    async def _write(self, kind: int, payload: bytes) -> None:
        self._writer.write(frame(kind, payload))
        await self._writer.drain()

    async def reply(self, call_id: int, value: Any = None, error: BaseException | None = None) -> None:
        await self._write(REPLY, dumps((call_id, False, _picklable(error))) if error is not None
                          else dumps((call_id, True, value)))

    async def events(self, batch: list[Any]) -> None:
        await self._write(EVENTS, dumps(batch))

    async def end(self, error: BaseException | None = None) -> None:
        await self._write(FAILED, dumps(_picklable(error))) if error is not None else await self._write(END, b"")


async def serve_session_channel(actor: Any, session_id: str, events: AsyncIterator[list[Any]],
                                channel: ActorChannel) -> None:
    """Serve one granted channel on `actor` (a `SessionActor`): stream
    `events` (its `events()` generator for this listener) and answer calls
    in the order they came, each for `session_id` only."""

    async def stream() -> None:
        try:
            async for batch in events:
                await channel.events(batch)
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception as e:  # the session ended before the stream began (SessionMoved), or failed
            await channel.end(e)
            return
        await channel.end()

    streaming = asyncio.get_running_loop().create_task(stream())
    try:
        async for call_id, method, args in channel.calls(CALLS, "a channel call"):
            try:
                value = await getattr(actor, method)(*args, session_id=session_id)
            except Exception as e:
                await channel.reply(call_id, error=e)
            else:
                await channel.reply(call_id, value)
    except Exception as e:  # a frame over the cap, one that does not unpickle: drop this channel, not the actor
        log.warning("session %s: channel dropped: %r", session_id, e)
    finally:
        streaming.cancel()
        with contextlib.suppress(BaseException):
            await streaming
