"""The push-text `TTSStream` over a provider's one-sentence calls
(`synthesize`, `stream(text)`): the default every TTS provider gets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing

from actors.providers.base import TTS, SynthesizedAudio, TTSStream


class SentenceTTSStream(TTSStream):
    """Segment by segment over `TTS.stream(text)`, one at a time and in order
    (side by side they would share the CPU and the first sentence, the one
    the listener waits for, would come last). A segment that fails ends with
    its error and the next one is still tried. An empty segment makes no
    call, only its `final` piece."""

    def __init__(self, tts: TTS) -> None:
        self._tts = tts
        self._text: list[str] = []
        self._segments: asyncio.Queue[tuple[int, str] | None] = asyncio.Queue()
        self._out: asyncio.Queue[SynthesizedAudio | None] = asyncio.Queue()
        self._next = 0
        self._ended = False
        self._worker = asyncio.get_running_loop().create_task(self._run())

    def push_text(self, text: str) -> None:
        if self._ended:
            raise RuntimeError("text pushed after end_input")
        self._text.append(text)

    def flush(self) -> int:
        if self._ended:
            raise RuntimeError("flush after end_input")
        segment, self._next = self._next, self._next + 1
        self._segments.put_nowait((segment, "".join(self._text)))
        self._text.clear()
        return segment

    def end_input(self) -> None:
        if self._ended:
            return
        if self._text:
            self.flush()
        self._ended = True
        self._segments.put_nowait(None)

    async def _run(self) -> None:
        try:
            while (item := await self._segments.get()) is not None:
                segment, text = item
                error: BaseException | None = None
                if text.strip():
                    try:
                        async with aclosing(self._tts.stream(text)) as pieces:  # type: ignore[type-var]
                            async for piece in pieces:
                                self._out.put_nowait(SynthesizedAudio(segment, audio=piece))
                    except Exception as e:
                        error = e
                self._out.put_nowait(SynthesizedAudio(segment, final=True, error=error))
        finally:
            self._out.put_nowait(None)

    async def __aiter__(self) -> AsyncIterator[SynthesizedAudio]:  # type: ignore[override]
        while (item := await self._out.get()) is not None:
            yield item

    async def cancel(self) -> None:
        self._ended = True
        if not self._worker.done():
            self._worker.cancel()
            await asyncio.wait([self._worker])
