"""The connection's side of a session channel (actors/session_channel.py):
one socket's link to its session, over the channel when the session actor
shares the node, else through Ray, with the same answers either way."""

from __future__ import annotations

import asyncio
import itertools
import logging
import pickle
from collections import deque
from typing import Any

import ray

from actors.session import EventStream, current_output
from actors.session_channel import CALL, END, EVENTS, FAILED, GRANT, REPLY, ChannelClosed, dumps, frame, read_frame

log = logging.getLogger(__name__)

MAX_EVENTS_BYTES = 256 << 20
"""The largest event batch the connection reads (an unpaced reply's audio)."""


class SessionLink:
    """A socket's link to its session: its event stream (`async for`) and
    its calls (`await link.call("send_audio", frames, ...)`). Over a
    channel when the session actor is on this node and
    `ingress.session_channel` is on, else through Ray (`EventStream` and
    actor calls): the same answers either way.

    The channel is asked for on the first `__anext__` (the connection's
    wait for `session.started`), so creating a link costs nothing."""

    def __init__(self, actor: Any, exclusive: str | None = None, *, sample_rate: int | None = None,
                 speak: bool | None = None, use_channel: bool = True) -> None:
        self._actor = actor
        self._output = current_output(sample_rate, speak)
        self._exclusive = exclusive
        self._use_channel = use_channel
        self._ray: EventStream | None = None
        self._opening: asyncio.Future[None] | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reading: asyncio.Task[None] | None = None
        self._events: deque[Any] = deque()
        self._events_ready = asyncio.Event()
        self._events_done: BaseException | None = None
        """Set when the stream ended: StopAsyncIteration, or what ended it."""
        self._replies: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count(1)
        self._closed = False

    @property
    def over_channel(self) -> bool:
        return self._writer is not None

    async def _opened(self) -> None:
        """Open once, whoever asks first (the stream's first read, a call)."""
        if self._opening is None:
            self._opening = asyncio.ensure_future(self._open())
        await asyncio.shield(self._opening)

    async def _open(self) -> None:
        if self._use_channel:
            try:
                open_channel = self._actor.open_channel
            except AttributeError:  # an actor started by an older release, still hosting through an upgrade
                open_channel = None
            offer = None if open_channel is None else await open_channel.remote(
                ray.get_runtime_context().get_node_id(), self._exclusive, self._output)
            if offer is not None:
                path, token = offer
                try:
                    self._reader, self._writer = await asyncio.open_unix_connection(path)
                except OSError as e:  # not on this machine after all (containers): Ray works anywhere
                    log.warning("session channel %s unreachable (%r); using Ray calls", path, e)
                else:
                    self._writer.write(frame(GRANT, token))
                    self._reading = asyncio.get_running_loop().create_task(self._read())
                    return
        self._ray = EventStream(self._actor, self._exclusive, sample_rate=self._output.sample_rate,
                                speak=self._output.speak, pace=self._output.pace)

    async def _read(self) -> None:
        assert self._reader is not None
        error: BaseException = ChannelClosed("the session actor's process closed it")
        try:
            while True:
                kind, payload = await read_frame(self._reader, MAX_EVENTS_BYTES)
                if kind == EVENTS:
                    self._events.extend(pickle.loads(payload))
                    self._events_ready.set()
                elif kind == REPLY:
                    call_id, ok, value = pickle.loads(payload)
                    future = self._replies.pop(call_id, None)
                    if future is not None and not future.done():
                        future.set_result(value) if ok else future.set_exception(value)
                elif kind in (END, FAILED):
                    self._finish_events(StopAsyncIteration() if kind == END else pickle.loads(payload))
                else:
                    raise ValueError(f"unexpected channel frame {kind!r}")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except Exception as e:  # a frame over the cap or that does not unpickle: the channel is unusable
            error = ChannelClosed(repr(e))
            log.warning("session channel dropped: %r", e)
        finally:
            self._finish_events(error)
            for future in self._replies.values():
                if not future.done():
                    future.set_exception(error)
            self._replies.clear()
            if self._writer is not None:
                self._writer.close()

    def _finish_events(self, outcome: BaseException) -> None:
        if self._events_done is None:
            self._events_done = outcome
            self._events_ready.set()

    # ------------------------------------------------------------ the event stream
    def __aiter__(self) -> SessionLink:
        return self

    async def __anext__(self) -> Any:
        await self._opened()
        if self._ray is not None:
            return await self._ray.__anext__()
        while not self._events:
            if self._events_done is not None:
                raise self._events_done
            self._events_ready.clear()
            await self._events_ready.wait()
        return self._events.popleft()

    # ------------------------------------------------------------ calls
    async def call(self, method: str, *args: Any) -> Any:
        """`method` on the session, answered in the order called."""
        await self._opened()
        if self._writer is None:
            return await getattr(self._actor, method).remote(*args)
        if self._reading is not None and self._reading.done():
            raise ChannelClosed("the session actor's process closed it")
        call_id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._replies[call_id] = future
        try:
            self._writer.write(frame(CALL, dumps((call_id, method, args))))
            await self._writer.drain()
        except ConnectionError as e:
            self._replies.pop(call_id, None)
            raise ChannelClosed(repr(e)) from e
        return await future

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._ray is not None:
            self._ray.close()
        if self._opening is not None and not self._opening.done():
            self._opening.cancel()
        if self._reading is not None:
            self._reading.cancel()
        if self._writer is not None:
            self._writer.close()
