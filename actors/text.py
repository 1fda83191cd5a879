"""Sentence splitting for speech: TTS speaks a reply sentence by sentence,
so the first sentence must be cut off the LLM stream as soon as it ends."""

from __future__ import annotations

import re

_CJK_END = "。！？；…"
_LATIN_END = ".!?;"
# Latin punctuation ends a sentence only before whitespace ("3.5" and "e.g."
# inside a word do not); CJK punctuation ends one wherever it stands.
_BOUNDARY = re.compile(rf"([{_CJK_END}]+[”’\"')）]*)|([{_LATIN_END}]+[\"')\]]*)(?=\s)")


_CLAUSE = re.compile(r"[,，、:：—]\s*")


class SentenceSplitter:
    """`first_soft_limit`: the first piece of a reply is cut at a clause
    boundary (comma, colon, dash) once it is this long, because the listener
    waits for the first piece and a long sentence takes long to synthesise."""

    def __init__(self, min_chars: int = 2, first_soft_limit: int = 60) -> None:
        self._buf = ""
        self._min_chars = min_chars
        self._first_soft_limit = first_soft_limit
        self._emitted = False

    def feed(self, text: str) -> list[str]:
        """Add streamed text; return the pieces ready to be spoken."""
        self._buf += text
        out: list[str] = []
        while (piece := self._next_piece()) is not None:
            out.append(piece)
            self._emitted = True
        return out

    def _next_piece(self) -> str | None:
        end = next((m.end() for m in _BOUNDARY.finditer(self._buf)
                    if len(self._buf[:m.end()].strip()) >= self._min_chars), None)
        if not self._emitted:
            region = self._buf if end is None else self._buf[:end]
            if len(region) >= self._first_soft_limit:
                cut = next((m.end() for m in _CLAUSE.finditer(region)
                            if m.start() >= self._first_soft_limit // 2), None)
                if cut is not None and (end is None or cut < end):
                    end = cut
        if end is None:
            return None
        piece, self._buf = self._buf[:end].strip(), self._buf[end:]
        return piece

    def flush(self) -> list[str]:
        """End of the reply: whatever is left is the last sentence."""
        rest, self._buf = self._buf.strip(), ""
        return [rest] if rest else []


def split_sentences(text: str) -> list[str]:
    splitter = SentenceSplitter()
    return splitter.feed(text) + splitter.flush()
