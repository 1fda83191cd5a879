"""TTS child: sentences out of the reply stream, synthesised one by one,
paced out in real time, cancelled at once on interruption.

Synthesis of sentence k+1 runs while sentence k plays. Audio is sent at most
`prebuffer_ms` ahead of the listener, so an interruption drops everything the
listener has not heard yet, and the child can tell which words were heard.

Output settings belong to each subscriber (`OutputPrefs`), not to the
session: a sentence is synthesised only while some subscriber wants speech,
it is resampled once per distinct output rate, and the session paces audio in
real time while any speaking subscriber wants pacing (docs/architecture.md).
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from actors.audio import resample_pcm16
from actors.config import TTSConfig
from actors.events import AudioChunk, ErrorCode, TTSAudioEnd, TTSSentence, TTSStart, TTSStop
from actors.mailbox import Child, Message
from actors.providers.base import TTS, AudioSegment
from actors.text import SentenceSplitter

if TYPE_CHECKING:
    from actors.session_core import SessionCore

MIN_OUTPUT_RATE, MAX_OUTPUT_RATE = 8000, 48000


@dataclass(frozen=True)
class OutputPrefs:
    """What one subscriber (one `events()` stream) wants of the session's
    speech. None leaves a field to the session's default
    (`session.output_sample_rate`, speech on, `tts.pace`).

    - `sample_rate`: the rate its audio chunks arrive at.
    - `speak`: False for text-only clients; they get no `tts.audio`, and a
      session whose subscribers are all text-only synthesises nothing.
    - `pace`: False for a client that wants the whole reply at once (HTTP);
      honoured only while no other speaking subscriber wants real time.
    """

    sample_rate: int | None = None
    speak: bool | None = None
    pace: bool | None = None

    def __post_init__(self) -> None:
        rate = self.sample_rate
        if rate is not None and (not isinstance(rate, int) or not MIN_OUTPUT_RATE <= rate <= MAX_OUTPUT_RATE):
            raise ValueError(f"output sample_rate must be {MIN_OUTPUT_RATE}-{MAX_OUTPUT_RATE} Hz, got {rate!r}")

    def over(self, base: OutputPrefs | None) -> OutputPrefs:
        """These preferences, with the fields left unset taken from `base`."""
        if base is None:
            return self
        return OutputPrefs(
            sample_rate=self.sample_rate if self.sample_rate is not None else base.sample_rate,
            speak=self.speak if self.speak is not None else base.speak,
            pace=self.pace if self.pace is not None else base.pace,
        )


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


class _SentenceAudio:
    """One synthesised sentence, resampled lazily once per output rate that a
    subscriber asks for, and cut on one time grid: chunk k covers the same
    milliseconds at every rate, so subscribers at different rates hear the
    same audio under the same sequence numbers."""

    def __init__(self, segment: AudioSegment, chunk_ms: int) -> None:
        self._segment = segment
        self._chunk_ms = chunk_ms
        self._by_rate: dict[int, bytes] = {}
        self.duration_ms = len(segment.pcm16) / 2 / segment.sample_rate * 1000.0
        self.chunks = math.ceil(self.duration_ms / chunk_ms) if segment.pcm16 else 0

    def chunk_duration_ms(self, k: int) -> float:
        return min(float(self._chunk_ms), self.duration_ms - k * self._chunk_ms)

    def chunk(self, rate: int, k: int) -> bytes:
        pcm = self._by_rate.get(rate)
        if pcm is None:  # linear resampling of a whole sentence: no seams between chunks
            pcm = self._by_rate[rate] = resample_pcm16(self._segment.pcm16, self._segment.sample_rate, rate)
        start = round(k * self._chunk_ms * rate / 1000) * 2
        end = len(pcm) if k == self.chunks - 1 else round((k + 1) * self._chunk_ms * rate / 1000) * 2
        return pcm[start:end]


@dataclass
class _Playback:
    """One turn's reply being spoken."""

    turn: int
    splitter: SentenceSplitter = field(default_factory=SentenceSplitter)
    queue: asyncio.Queue[tuple[str, asyncio.Task[AudioSegment] | None] | None] = field(
        default_factory=asyncio.Queue)
    player: asyncio.Task[None] | None = None
    last_synth: asyncio.Task[AudioSegment] | None = None
    started: bool = False
    clock_start: float | None = None
    paced: bool = True
    """Whether the last chunk was paced: when pacing comes back (a listener
    joined an HTTP reply) the clock restarts instead of sleeping off the lead."""
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

    def __init__(self, core: SessionCore, tts: TTS, config: TTSConfig) -> None:
        super().__init__(core.child_crashed)
        self._core = core
        self._tts = tts
        self._cfg = config
        self._turns: dict[int, _Playback] = {}
        self.synthesized = 0
        """Sentences sent to the TTS provider (stats: text-only sessions send none)."""

    @property
    def speaking_turn(self) -> int | None:
        return next((t for t, p in self._turns.items() if p.started), None)

    async def handle(self, message: Message) -> None:
        turn = message.turn_id
        assert turn is not None
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
        """Queue a sentence to play; synthesise it only if a subscriber wants
        speech now (a text-only turn must not spend TTS time)."""
        if not self._core.wants_speech:
            pb.queue.put_nowait((sentence, None))
            return
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
        self.synthesized += 1
        return await self._tts.synthesize(sentence)

    async def _play(self, pb: _Playback) -> None:
        while (item := await pb.queue.get()) is not None:
            sentence, synth = item
            if synth is None or not self._core.wants_speech:  # nobody listens: skip, do not wait
                if synth is not None:
                    synth.cancel()
                continue
            try:
                segment = await synth
            except Exception as e:
                self._core.emit_error(ErrorCode.TTS_FAILED, f"could not speak a sentence: {e}", pb.turn)
                continue
            await self._play_sentence(pb, sentence, _SentenceAudio(segment, self._cfg.chunk_ms))
        if pb.started:
            self._core.emit(TTSAudioEnd(turn_id=pb.turn))
        if self._core.paced and pb.clock_start is not None:
            # tts.stop marks the end of playback at the client, not the end of sending
            left_ms = pb.sent_ms - pb.played_ms() + self._cfg.stop_margin_ms
            await asyncio.sleep(max(0.0, left_ms / 1000.0))
        self._turns.pop(pb.turn, None)
        if pb.started:
            self._core.emit(TTSStop(turn_id=pb.turn, reason="done"))
        self._core.on_reply_done(pb.turn)

    async def _play_sentence(self, pb: _Playback, sentence: str, audio: _SentenceAudio) -> None:
        if not audio.chunks:
            return
        if not pb.started:
            pb.started = True
            self._core.emit_per_rate(lambda rate: TTSStart(turn_id=pb.turn, sample_rate=rate))
        self._core.emit(TTSSentence(turn_id=pb.turn, text=sentence))
        pb.spoken.append(_Spoken(sentence, pb.sent_ms, audio.duration_ms))
        for k in range(audio.chunks):
            await self._pace(pb)
            if pb.seq == 0:
                self._core.timer(pb.turn).first_audio = time.time()
            self._emit_chunk(pb, audio, k)
            pb.seq += 1
            pb.sent_ms += audio.chunk_duration_ms(k)

    def _emit_chunk(self, pb: _Playback, audio: _SentenceAudio, k: int) -> None:
        """Chunk k to every speaking subscriber, made once per output rate."""
        turn, seq = pb.turn, pb.seq
        self._core.emit_per_rate(
            lambda rate: AudioChunk(turn_id=turn, seq=seq, sample_rate=rate, pcm16=audio.chunk(rate, k)),
            speakers_only=True)

    async def _pace(self, pb: _Playback) -> None:
        now = time.monotonic()
        if pb.clock_start is None:
            pb.clock_start = now
        paced, was_paced = self._core.paced, pb.paced
        pb.paced = paced
        if not paced:
            return
        elapsed_ms = (now - pb.clock_start) * 1000.0
        if elapsed_ms > pb.sent_ms or not was_paced:
            # an underrun (the listener waited) or pacing just resumed: restart the clock here
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
                if item is not None and item[1] is not None:
                    item[1].cancel()
            if pb.started:
                self._core.emit(TTSStop(turn_id=turn, reason="interrupted",
                                        stream_ms=self._core.interrupt_stream_ms))

    async def stop(self) -> None:
        self.on_interrupt(max(self._turns, default=-1))
        await super().stop()
