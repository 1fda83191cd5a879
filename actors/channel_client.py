"""The caller's end of a granted channel (actors/session_channel.py): calls
answered by id over one Unix socket, whatever else the actor sends handed
to the owner.

Shared by a socket's link to its session (actors/session_link.py, which
also reads the session's events from it) and a process's calls to the
provider pools on its node (actors/pool_channel.py). When the socket
closes, every pending call and the owner learn it as `ChannelClosed`, a
`RayActorError`, which both already answer as a dead actor.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import pickle
from collections.abc import Callable
from typing import Any

from actors.session_channel import CALL, GRANT, REPLY, ChannelClosed, dumps, frame, read_frame

log = logging.getLogger(__name__)

FrameHandler = Callable[[int, bytes], None]
"""What the owner does with a frame that is not a reply; raises ValueError for one it does not expect."""
CloseHandler = Callable[[BaseException], None]


class ChannelClient:
    """One connected, granted channel. `call` may be awaited by many tasks
    at once; replies find their callers by id, in whatever order the actor
    answers."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, max_frame: int,
                 on_frame: FrameHandler | None = None, on_close: CloseHandler | None = None) -> None:
        self._reader, self._writer = reader, writer
        self._max_frame = max_frame
        self._on_frame = on_frame
        self._on_close = on_close
        self._replies: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count(1)
        self._reading = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def connect(cls, path: str, token: bytes, *, max_frame: int, on_frame: FrameHandler | None = None,
                      on_close: CloseHandler | None = None) -> ChannelClient:
        """Connect to the actor's socket at `path` and show the grant;
        OSError if the socket cannot be reached (not this machine after all)."""
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(frame(GRANT, token))
        return cls(reader, writer, max_frame=max_frame, on_frame=on_frame, on_close=on_close)

    @property
    def closed(self) -> bool:
        return self._reading.done()

    async def _read(self) -> None:
        error: BaseException = ChannelClosed("the actor's process closed it")
        try:
            while True:
                kind, payload = await read_frame(self._reader, self._max_frame)
                if kind == REPLY:
                    call_id, ok, value = pickle.loads(payload)
                    future = self._replies.pop(call_id, None)
                    if future is not None and not future.done():
                        future.set_result(value) if ok else future.set_exception(value)
                elif self._on_frame is not None:
                    self._on_frame(kind, payload)
                else:
                    raise ValueError(f"unexpected channel frame {kind!r}")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except Exception as e:  # a frame over the cap or that does not unpickle: the channel is unusable
            error = ChannelClosed(repr(e))
            log.warning("channel dropped: %r", e)
        finally:
            if self._on_close is not None:
                self._on_close(error)
            for future in self._replies.values():
                if not future.done():
                    future.set_exception(error)
            self._replies.clear()
            self._writer.close()

    async def call(self, method: str, *args: Any) -> Any:
        """`method(*args)` on the actor's side; its exception if it raised."""
        if self.closed:
            raise ChannelClosed("the actor's process closed it")
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
        self._reading.cancel()
        self._writer.close()
