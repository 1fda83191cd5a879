"""TTS child: sentences out of the reply stream, synthesised one by one,
paced out in real time, cancelled at once on interruption.

Synthesis of sentence k+1 runs while sentence k plays. Audio is sent at most
`prebuffer_ms` ahead of the listener, so an interruption drops everything the
listener has not heard yet, and the child can tell which words were heard.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from actors.audio import resample_pcm16
from actors.config import TTSConfig
from actors.events import AudioChunk, ErrorCode, TTSSentence, TTSStart, TTSStop
from actors.mailbox import Child, Message
from actors.providers.base import TTS, AudioSegment
from actors.text import SentenceSplitter

if TYPE_CHECKING:
    from actors.session_core import SessionCore


@dataclass
class TextDelta(Message):
    text: str = ""


@dataclass
class TextEnd(Message):
    pass


@dataclass
class _Spoken:
    text: str
    start_ms: float
    duration_ms: float


@dataclass
class _Playback:
    """One turn's reply being spoken."""

    turn: int
    splitter: SentenceSplitter = field(default_factory=SentenceSplitter)
    queue: asyncio.Queue[tuple[str, asyncio.Task[AudioSegment]] | None] = field(default_factory=asyncio.Queue)
    player: asyncio.Task[None] | None = None
    last_synth: asyncio.Task[AudioSegment] | None = None
    started: bool = False
    clock_start: float | None = None
    sent_ms: float = 0.0
    spoken: list[_Spoken] = field(default_factory=list)
    seq: int = 0

    def played_ms(self) -> float:
        if self.clock_start is None:
            return 0.0
        return min(self.sent_ms, (time.monotonic() - self.clock_start) * 1000.0)

    def heard_text(self) -> str:
        played = self.played_ms()
        words: list[str] = []
        for s in self.spoken:
            if s.start_ms + s.duration_ms <= played:
                words.extend(s.text.split())
            elif s.start_ms < played:
                sentence_words = s.text.split()
                share = (played - s.start_ms) / max(s.duration_ms, 1.0)
                words.extend(sentence_words[: int(len(sentence_words) * share)])
        return " ".join(words)


class TTSChild(Child):
    name = "tts"

    def __init__(self, core: SessionCore, tts: TTS, config: TTSConfig, output_rate: int) -> None:
        super().__init__(core.child_crashed)
        self._core = core
        self._tts = tts
        self._cfg = config
        self.speak = True
        self.pace = config.pace
        self.output_rate = output_rate
        self._turns: dict[int, _Playback] = {}

    @property
    def speaking_turn(self) -> int | None:
        return next((t for t, p in self._turns.items() if p.started), None)

    async def handle(self, message: Message) -> None:
        turn = message.turn_id
        assert turn is not None
        if not self.speak:  # a text-only client: the reply ends with its text
            if isinstance(message, TextEnd):
                self._core.on_reply_done(turn)
            return
        pb = self._turns.get(turn)
        if pb is None:
            pb = self._turns[turn] = _Playback(turn)
            pb.player = asyncio.get_running_loop().create_task(self._play(pb))
        if isinstance(message, TextDelta):
            for sentence in pb.splitter.feed(message.text):
                self._enqueue(pb, sentence)
        elif isinstance(message, TextEnd):
            for sentence in pb.splitter.flush():
                self._enqueue(pb, sentence)
            pb.queue.put_nowait(None)

    def _enqueue(self, pb: _Playback, sentence: str) -> None:
        timer = self._core.timer(pb.turn)
        if timer.first_sentence is None:
            timer.first_sentence = time.time()
        task = asyncio.get_running_loop().create_task(self._synthesize_after(pb.last_synth, sentence))
        pb.last_synth = task
        pb.queue.put_nowait((sentence, task))

    async def _synthesize_after(self, previous: asyncio.Task[AudioSegment] | None, sentence: str) -> AudioSegment:
        """One sentence at a time, in order: run side by side they would all
        share the CPU and the first sentence (the one the listener waits for)
        would come last."""
        if previous is not None:
            await asyncio.wait([previous])
        return await self._tts.synthesize(sentence)

    async def _play(self, pb: _Playback) -> None:
        chunk_bytes = self.output_rate * self._cfg.chunk_ms // 1000 * 2
        while (item := await pb.queue.get()) is not None:
            sentence, synth = item
            try:
                segment = await synth
            except Exception as e:
                self._core.emit_error(ErrorCode.TTS_FAILED, f"could not speak a sentence: {e}", pb.turn)
                continue
            pcm = resample_pcm16(segment.pcm16, segment.sample_rate, self.output_rate)
            if not pcm:
                continue
            if not pb.started:
                pb.started = True
                self._core.emit(TTSStart(turn_id=pb.turn, sample_rate=self.output_rate))
            self._core.emit(TTSSentence(turn_id=pb.turn, text=sentence))
            pb.spoken.append(_Spoken(sentence, pb.sent_ms, len(pcm) / 2 / self.output_rate * 1000.0))
            for i in range(0, len(pcm), chunk_bytes):
                await self._pace(pb)
                chunk = pcm[i:i + chunk_bytes]
                if pb.seq == 0:
                    self._core.timer(pb.turn).first_audio = time.time()
                self._core.emit(AudioChunk(turn_id=pb.turn, seq=pb.seq, sample_rate=self.output_rate, pcm16=chunk))
                pb.seq += 1
                pb.sent_ms += len(chunk) / 2 / self.output_rate * 1000.0
        if self.pace and pb.clock_start is not None:
            # tts.stop marks the end of playback, not the end of sending
            await asyncio.sleep(max(0.0, (pb.sent_ms - pb.played_ms()) / 1000.0))
        self._turns.pop(pb.turn, None)
        if pb.started:
            self._core.emit(TTSStop(turn_id=pb.turn, reason="done"))
        self._core.on_reply_done(pb.turn)

    async def _pace(self, pb: _Playback) -> None:
        now = time.monotonic()
        if pb.clock_start is None:
            pb.clock_start = now
        if not self.pace:
            return
        elapsed_ms = (now - pb.clock_start) * 1000.0
        if elapsed_ms > pb.sent_ms:  # underrun: the listener waited, so shift the clock
            pb.clock_start = now - pb.sent_ms / 1000.0
            return
        ahead_ms = pb.sent_ms - elapsed_ms
        if ahead_ms > self._cfg.prebuffer_ms:
            await asyncio.sleep((ahead_ms - self._cfg.prebuffer_ms) / 1000.0)

    def heard_text(self, turn: int) -> str:
        pb = self._turns.get(turn)
        return pb.heard_text() if pb else ""

    def on_interrupt(self, turn_id: int) -> None:
        for turn in [t for t in self._turns if t <= turn_id]:
            pb = self._turns.pop(turn)
            if pb.player is not None:
                pb.player.cancel()
            while not pb.queue.empty():
                item = pb.queue.get_nowait()
                if item is not None:
                    item[1].cancel()
            if pb.started:
                self._core.emit(TTSStop(turn_id=turn, reason="interrupted",
                                        stream_ms=self._core.interrupt_stream_ms))

    async def stop(self) -> None:
        self.on_interrupt(max(self._turns, default=-1))
        await super().stop()
