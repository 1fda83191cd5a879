"""The connection's side of a session channel (actors/session_channel.py):
one socket's link to its session, over the channel when the session actor
shares the node, else through Ray, with the same answers either way."""

from __future__ import annotations

import asyncio
import logging
import pickle
from collections import deque
from typing import Any

import ray

from actors.channel_client import ChannelClient
from actors.session import EventStream, current_output
from actors.session_channel import END, EVENTS, FAILED

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
        self._channel: ChannelClient | None = None
        self._events: deque[Any] = deque()
        self._events_ready = asyncio.Event()
        self._events_done: BaseException | None = None
        """Set when the stream ended: StopAsyncIteration, or what ended it."""
        self._closed = False

    @property
    def over_channel(self) -> bool:
        return self._channel is not None

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
                    self._channel = await ChannelClient.connect(path, token, max_frame=MAX_EVENTS_BYTES,
                                                                on_frame=self._on_frame, on_close=self._finish_events)
                except OSError as e:  # not on this machine after all (containers): Ray works anywhere
                    log.warning("session channel %s unreachable (%r); using Ray calls", path, e)
                else:
                    return
        self._ray = EventStream(self._actor, self._exclusive, sample_rate=self._output.sample_rate,
                                speak=self._output.speak, pace=self._output.pace)

    def _on_frame(self, kind: int, payload: bytes) -> None:
        """The session's events on the channel (replies are the client's)."""
        if kind == EVENTS:
            self._events.extend(pickle.loads(payload))
            self._events_ready.set()
        elif kind in (END, FAILED):
            self._finish_events(StopAsyncIteration() if kind == END else pickle.loads(payload))
        else:
            raise ValueError(f"unexpected channel frame {kind!r}")

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
        if self._channel is None:
            return await getattr(self._actor, method).remote(*args)
        return await self._channel.call(method, *args)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._ray is not None:
            self._ray.close()
        if self._opening is not None and not self._opening.done():
            self._opening.cancel()
        if self._channel is not None:
            self._channel.close()
