"""STTStream child: streams one utterance at a time to the STT provider and
reports partial and final transcripts."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from actors.events import ErrorCode, STTPartial
from actors.mailbox import Child, Message
from actors.providers.base import STT, ProviderError, STTStreamSession

if TYPE_CHECKING:
    from actors.session_core import SessionCore

log = logging.getLogger(__name__)


@dataclass
class SpeechBegan(Message):
    audio: bytes = b""


@dataclass
class SpeechAudio(Message):
    audio: bytes = b""


@dataclass
class SpeechEnded(Message):
    pass


@dataclass
class SpeechPaused(Message):
    """`vad.pause_ms` of silence inside the utterance: it may be ending."""


@dataclass
class SpeechResumed(Message):
    """Speech again after a pause: the utterance goes on."""


class STTStream(Child):
    name = "stt_stream"

    def __init__(self, core: SessionCore, stt: STT, partial_interval_ms: int) -> None:
        super().__init__(core.child_crashed)
        self._core = core
        self._stt = stt
        self._stream: STTStreamSession | None = None
        self._partial_interval = partial_interval_ms / 1000.0
        self._last_partial = 0.0
        self._partial_task: asyncio.Task[None] | None = None

    async def handle(self, message: Message) -> None:
        turn = message.turn_id
        assert turn is not None
        if isinstance(message, SpeechBegan):
            await self._abandon()
            self._stream = self._stt.open_stream()
            self._last_partial = time.monotonic()
            await self._stream.push(message.audio)
        elif isinstance(message, SpeechAudio) and self._stream is not None:
            await self._stream.push(message.audio)
            self._maybe_partial(turn)
        elif isinstance(message, SpeechPaused) and self._stream is not None and self._stream.live:
            text = self._stream.transcript_so_far()
            if text:
                self._core.on_pause(turn, text)
        elif isinstance(message, SpeechResumed):
            self._core.on_resume(turn)
        elif isinstance(message, SpeechEnded) and self._stream is not None:
            stream, self._stream = self._stream, None
            if self._partial_task is not None:
                self._partial_task.cancel()
            try:
                text = await stream.finish()
            except ProviderError as e:
                log.warning("session %s turn %d: speech recognition failed: %s", self._core.session_id, turn,
                            e.message, exc_info=True)
                self._core.emit_error(ErrorCode.STT_FAILED, e.message, turn)
                text = ""
            self._core.on_transcript(turn, text)

    def _maybe_partial(self, turn: int) -> None:
        """A streaming recogniser's interim text goes out as soon as it is
        there; a batch decoder re-decodes at most every `partial_interval`."""
        if self._stream is None:
            return
        if self._stream.live:
            self._run_partial(turn, self._stream)
            return
        if self._partial_interval <= 0:
            return
        if self._partial_task is not None and not self._partial_task.done():
            return
        if time.monotonic() - self._last_partial < self._partial_interval:
            return
        self._last_partial = time.monotonic()
        self._run_partial(turn, self._stream)

    def _run_partial(self, turn: int, stream: STTStreamSession) -> None:
        if self._partial_task is not None and not self._partial_task.done():
            return

        async def run() -> None:
            try:
                text = await stream.partial()
            except ProviderError:
                return  # a lost partial is harmless; the final reports errors
            if text:
                self._core.emit(STTPartial(turn_id=turn, text=text))

        self._partial_task = asyncio.get_running_loop().create_task(run())

    async def _abandon(self) -> None:
        if self._stream is not None:
            await self._stream.cancel()
            self._stream = None
