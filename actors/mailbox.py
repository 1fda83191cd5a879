"""The in-process child actor: a mailbox, one message at a time, and a
control lane that jumps the queue.

Children run inside their session's process because a Ray actor costs ~48 MB
and ~0.4 s to start while one of these costs ~40 KB and ~1 ms (DESIGN §2).
They keep actor semantics: each owns its state and is touched only through
its mailbox (`post`) or the control lane (`interrupt`), which runs at once,
drops queued messages of the cancelled turn and cancels work in flight.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Callable

log = logging.getLogger(__name__)


@dataclass
class Message:
    turn_id: int | None
    """The turn this message belongs to; None for messages (like input
    audio) that no interruption may drop."""


class Child:
    """Base of the four session children."""

    name = "child"

    def __init__(self, on_crash: Callable[[str, BaseException], None]) -> None:
        self._mailbox: asyncio.Queue[Message | None] = asyncio.Queue()
        self._loop_task: asyncio.Task[None] | None = None
        self._work: asyncio.Task[Any] | None = None
        self._work_turn: int | None = None
        self._on_crash = on_crash

    def start(self) -> None:
        self._loop_task = asyncio.get_running_loop().create_task(self._run(), name=f"child:{self.name}")

    def post(self, message: Message) -> None:
        self._mailbox.put_nowait(message)

    @property
    def backlog(self) -> int:
        return self._mailbox.qsize()

    def interrupt(self, turn_id: int) -> None:
        """Control lane: forget everything of turns up to `turn_id`, now."""
        kept: list[Message | None] = []
        while not self._mailbox.empty():
            m = self._mailbox.get_nowait()
            self._mailbox.task_done()
            if m is None or m.turn_id is None or m.turn_id > turn_id:
                kept.append(m)
        for m in kept:
            self._mailbox.put_nowait(m)
        if (self._work is not None and not self._work.done() and self._work_turn is not None
                and self._work_turn <= turn_id):
            self._work.cancel()
        self.on_interrupt(turn_id)

    def on_interrupt(self, turn_id: int) -> None:
        """Children drop their own per-turn state here."""

    async def handle(self, message: Message) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        self._mailbox.put_nowait(None)
        if self._work is not None:
            self._work.cancel()
        if self._loop_task is not None:
            try:
                await asyncio.wait_for(self._loop_task, timeout=2.0)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                self._loop_task.cancel()

    async def drained(self) -> None:
        """Wait until every message posted so far has been handled."""
        await self._mailbox.join()

    async def _run(self) -> None:
        while True:
            message = await self._mailbox.get()
            if message is None:
                self._mailbox.task_done()
                return
            self._work_turn = message.turn_id
            self._work = asyncio.get_running_loop().create_task(self.handle(message))
            try:
                await self._work
            except asyncio.CancelledError:
                if self._loop_task is not None and self._loop_task.cancelling():
                    raise
            except Exception as e:  # a child's bug must not end the session; the owner logs it
                self._on_crash(f"{self.name} (on {type(message).__name__})", e)
            finally:
                self._work = None
                self._mailbox.task_done()
