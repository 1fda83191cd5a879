"""Moderation's post-check on a reply's text, before anyone sees or hears it.

The dialogue streams the LLM's words through a `ReplyGate` when moderation
is on: text is held until its sentence ends, the sentence is checked, and
only then goes on to the client (`llm.delta`), the TTS and the history. A
blocked sentence becomes the persona's safe reply (once per turn; later
blocked sentences are dropped), so what a text UI shows, what is spoken and
what the next prompt sees are the same, and the blocked words reach none.

The cost is the wait for a sentence's end (speech waits for it anyway).
With local rules only the check is synchronous (microseconds); with the
moderation endpoint each sentence's check starts as soon as it ends and
runs beside the checks of the sentences before it, and sentences are
released in order.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Protocol

from actors.agent.moderation import Moderator, Verdict
from actors.text import _BOUNDARY, speakable

log = logging.getLogger(__name__)

MAX_HELD_CHARS = 400
"""Text with no sentence end (a long list, code) is cut at a blank past this."""


class Release(Protocol):
    def __call__(self, text: str, phrase: bool = False) -> None:
        """Pass text on; `phrase`: it is the safe reply (a quick reply to the TTS)."""


class ReplyGate:
    """One turn's gate: `feed` the reply's text, `flush` at the end of each
    LLM round (before its tool calls run), `close` when the turn is cut."""

    def __init__(self, moderator: Moderator, safe_reply: str, release: Release) -> None:
        self._moderator = moderator
        self._safe_reply = safe_reply
        self.release = release
        """Where passed text goes (the dialogue points it at each LLM round)."""
        self._buf = ""
        self._pending: deque[tuple[str, Verdict | asyncio.Task[Verdict]]] = deque()
        self.safe_said = False
        self.blocked = 0

    def feed(self, text: str) -> None:
        """Each whole sentence (or line) held is checked on its own: a block
        replaces that sentence only."""
        self._buf += text
        start = 0
        for end in self._ends():
            self._check(self._buf[start:end])
            start = end
        self._buf = self._buf[start:]

    async def flush(self) -> None:
        """Everything fed so far, checked and released (in order)."""
        if self._buf:
            piece, self._buf = self._buf, ""
            self._check(piece)
        while self._pending:
            _, head = self._pending[0]
            if isinstance(head, asyncio.Task):
                await asyncio.wait([head])
            self._release_ready()

    def close(self) -> None:
        for _, verdict in self._pending:
            if isinstance(verdict, asyncio.Task):
                verdict.cancel()
        self._pending.clear()

    def _ends(self) -> list[int]:
        """Where the whole sentences (and lines) held end, in order."""
        buf = self._buf
        ends = sorted({m.end() for m in _BOUNDARY.finditer(buf)} | {i + 1 for i, ch in enumerate(buf) if ch == "\n"})
        if not ends and len(buf) > MAX_HELD_CHARS:
            ends = [buf.rfind(" ", 0, len(buf) - 1) + 1 or len(buf)]
        return ends

    def _check(self, piece: str) -> None:
        if not piece.strip():
            self._pending.append((piece, Verdict()))
        elif (verdict := self._now(piece)) is not None:
            self._pending.append((piece, verdict))
        else:
            task = asyncio.get_running_loop().create_task(self._later(piece))
            task.add_done_callback(lambda _: self._release_ready())
            self._pending.append((piece, task))
        self._release_ready()

    def _now(self, piece: str) -> Verdict | None:
        piece = piece.strip()
        verdict = self._moderator.check_sentence_now(piece)
        if verdict is not None and not verdict.blocked:
            verdict = self._moderator.check_sentence_now(speakable(piece)) or verdict  # `**ban**ana` is spoken "banana"
        return verdict

    async def _later(self, piece: str) -> Verdict:
        piece = piece.strip()
        verdict = await self._moderator.check_sentence(piece)
        if not verdict.blocked and (said := speakable(piece)) != piece:
            verdict = await self._moderator.check_sentence(said)
        return verdict

    def _release_ready(self) -> None:
        while self._pending:
            piece, verdict = self._pending[0]
            if isinstance(verdict, asyncio.Task):
                if not verdict.done():
                    return
                try:
                    verdict = verdict.result()
                except asyncio.CancelledError:  # the turn was cut: nothing of it goes on
                    self._pending.popleft()
                    continue
                except Exception:  # a bug in a check must not silence the reply; the operator sees it
                    log.exception("a moderation check failed")
                    verdict = Verdict()
            self._pending.popleft()
            if not verdict.blocked:
                self.release(piece)
                continue
            self.blocked += 1
            if not self.safe_said:
                self.safe_said = True
                lead, trail = piece[: len(piece) - len(piece.lstrip())], piece[len(piece.rstrip()):]
                self.release(f"{lead}{self._safe_reply}{trail}", True)
