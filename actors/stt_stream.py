"""STTStream child: streams one utterance at a time to the STT provider and
reports partial and final transcripts (the provider contract: push audio,
iterate `SpeechEvent`s, DESIGN §1)."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from contextlib import aclosing
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

    pause: int = 0
    """Which pause of the utterance (from 1): the words heard at it are answered with it."""
    stream_ms: int = 0
    """Where in the input audio it was heard (`STTPartial.stream_ms` of its decode)."""


@dataclass
class SpeechResumed(Message):
    """Speech again after a pause: the utterance goes on."""


class STTStream(Child):
    """One recognition stream per utterance: audio in as it comes, interim
    results out as `stt.partial` as they come, the transcript to the session
    at end of speech. A failure is reported at end of speech (the user is
    still talking until then) as `stt.failed`, with an empty transcript."""

    name = "stt_stream"

    def __init__(self, core: SessionCore, stt: STT, partial_interval_ms: int, decode_at_pause: bool = True) -> None:
        super().__init__(core.child_crashed)
        self._core = core
        self._stt = stt
        self._interim_every_s = partial_interval_ms / 1000.0
        self._decode_at_pause = decode_at_pause
        self._stream: STTStreamSession | None = None
        self._reader: asyncio.Task[str | ProviderError] | None = None
        self._latest = ""
        self._paused = 0
        """Between a pause and speech again, the pause's number: a batch decoder's next interim is its decode."""
        self._paused_ms = 0
        self.decodes: Counter[str] = Counter()
        """A batch decoder's decodes by kind, summed over utterances (stats: the cost of `decode_at_pause`)."""

    async def handle(self, message: Message) -> None:
        turn = message.turn_id
        assert turn is not None
        if isinstance(message, SpeechBegan):
            await self._abandon()
            self._stream = self._stt.open_stream(self._interim_every_s)
            self._latest, self._paused = "", 0
            await self._stream.push(message.audio)
            self._reader = asyncio.get_running_loop().create_task(self._read(turn, self._stream))
        elif isinstance(message, SpeechAudio) and self._stream is not None:
            await self._stream.push(message.audio)
        elif isinstance(message, SpeechPaused) and self._stream is not None:
            if self._stream.live:  # its latest interim already has the words: the reply may start on them
                if self._latest:
                    self._core.on_pause(turn, self._latest, message.pause)
            elif self._decode_at_pause:  # the reply may start when the decode of the pause comes in (`_read`)
                self._paused, self._paused_ms = message.pause, message.stream_ms
                await self._stream.speech_paused()
        elif isinstance(message, SpeechResumed):
            self._paused = 0
            if self._stream is not None:
                await self._stream.speech_resumed()
            self._core.on_resume(turn)
        elif isinstance(message, SpeechEnded) and self._stream is not None and self._reader is not None:
            stream, reader, self._stream, self._reader = self._stream, self._reader, None, None
            await stream.end_input()
            result = await reader
            self.decodes.update(getattr(stream, "decodes", None) or {})
            if isinstance(result, ProviderError):
                log.warning("session %s turn %d: speech recognition failed: %s", self._core.session_id, turn,
                            result.message, exc_info=(type(result), result, result.__traceback__))
                self._core.emit_error(ErrorCode.STT_FAILED, result.message, turn)
                result = ""
            self._core.on_transcript(turn, result)

    async def _read(self, turn: int, stream: STTStreamSession) -> str | ProviderError:
        """Interims out while the user speaks; → the transcript, or the failure."""
        try:
            async with aclosing(stream.events()) as events:  # type: ignore[type-var]
                async for event in events:
                    if event.kind == "end":
                        return event.text
                    if event.text and event.text != self._latest:
                        self._latest = event.text
                        of_pause = bool(self._paused) and not stream.live
                        self._core.emit(STTPartial(turn_id=turn, text=event.text,
                                                   stream_ms=self._paused_ms if of_pause else None))
                        if of_pause:
                            self._core.on_pause(turn, event.text, self._paused)
        except ProviderError as e:
            return e
        except Exception as e:  # a provider's own exception: still a failed utterance, not a crashed child
            error = ProviderError("stt.failed", f"speech recognition failed ({type(e).__name__})")
            error.__cause__ = e
            return error
        return ProviderError("stt.failed", "speech recognition ended without a transcript")

    async def _abandon(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        if self._stream is not None:
            await self._stream.cancel()
            self._stream = None
