"""Streaming recognition over a batch decoder (Whisper): the `STT` stream
contract for a provider that only has `transcribe`."""

from __future__ import annotations

import asyncio
import time

from actors.providers.base import STT, ProviderError, QueuedSTTStream, SpeechEvent


class BufferedSTTStream(QueuedSTTStream):
    """A stream over a batch decoder (DESIGN §4: Whisper is not a streaming
    model): the audio is kept, an interim is a re-decode of all of it at most
    every `interim_every_s` (never two at once), and the transcript is one
    decode at the end.

    At a pause (`speech_paused`) it decodes the audio so far at once: if the
    utterance then ends with no more speech (only the silence that decided
    the end), that decode is the transcript, so the decode ran during the
    VAD's end-silence wait instead of after it. Its result also goes out as
    an interim (the session may start the reply on it). Speech resuming
    makes it stale: the end then decodes everything, as without a pause."""

    def __init__(self, stt: STT, interim_every_s: float = 0.0) -> None:
        super().__init__()
        self._stt = stt
        self._audio = bytearray()
        self._every = interim_every_s
        self._last_interim = time.monotonic()
        self._last_text = ""
        self._interim_task: asyncio.Task[None] | None = None
        self._final_task: asyncio.Task[None] | None = None
        self._at_pause: asyncio.Task[str | None] | None = None
        """The decode started at the last pause; None once speech resumed."""
        self.decodes = {"interim": 0, "at_pause": 0, "at_pause_used": 0, "final": 0}

    async def push(self, pcm16: bytes) -> None:
        if self._final_task is not None or self.over:
            return
        self._audio.extend(pcm16)
        if (self._every > 0 and self._at_pause is None
                and (self._interim_task is None or self._interim_task.done())
                and time.monotonic() - self._last_interim >= self._every):
            self._last_interim = time.monotonic()
            self._interim_task = asyncio.get_running_loop().create_task(self._interim(len(self._audio)))

    async def _interim(self, upto: int) -> None:
        self.decodes["interim"] += 1
        try:
            text = await self._stt.transcribe(bytes(self._audio[:upto]))
        except ProviderError:
            return  # a lost interim is harmless; the transcript reports failures
        self._say_interim(text)

    def _say_interim(self, text: str) -> None:
        if text and text != self._last_text and self._final_task is None:
            self._last_text = text
            self._put(SpeechEvent("interim", text))

    async def speech_paused(self) -> None:
        if self._final_task is not None or self.over or self._at_pause is not None:
            return
        if self._interim_task is not None:
            self._interim_task.cancel()  # older than what is decoded now
        self.decodes["at_pause"] += 1
        self._at_pause = asyncio.get_running_loop().create_task(self._decode_at_pause(bytes(self._audio)))

    async def _decode_at_pause(self, audio: bytes) -> str | None:
        try:
            text = await self._stt.transcribe(audio)
        except ProviderError:
            return None  # the end decodes again and reports a failure then
        if self._at_pause is asyncio.current_task():
            self._say_interim(text)
        return text

    async def speech_resumed(self) -> None:
        if self._at_pause is not None and self._final_task is None:
            self._at_pause.cancel()
            self._at_pause = None

    async def end_input(self) -> None:
        if self._final_task is not None or self.over:
            return
        if self._interim_task is not None:
            self._interim_task.cancel()
        self._final_task = asyncio.get_running_loop().create_task(self._final(self._at_pause))

    async def _final(self, at_pause: asyncio.Task[str | None] | None) -> None:
        try:
            text = await at_pause if at_pause is not None else None
            if text is not None:
                self.decodes["at_pause_used"] += 1
            else:
                self.decodes["final"] += 1
                text = await self._stt.transcribe(bytes(self._audio))
        except Exception as e:
            self._put_error(e)
        else:
            self._put(SpeechEvent("end", text))

    async def cancel(self) -> None:
        for task in (self._interim_task, self._final_task, self._at_pause):
            if task is not None:
                task.cancel()
        self._put_closed()
