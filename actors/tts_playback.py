"""What one reply being spoken holds: its sentences' audio and the clock it is played on.

`SentenceAudio` keeps one sentence's audio on one time grid for every
output rate (subscribers at different rates hear the same chunks under the
same sequence numbers); `Playback` is one turn's reply in flight (its
sentences, their synthesis, what has been sent and so heard). Both belong
to the TTS child (actors/tts.py), which alone drives them.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from actors.providers.base import AudioSegment, TTSStream
from actors.text import EmotionFilter, MarkdownLines, SentenceSplitter

if TYPE_CHECKING:
    from actors.agent.moderation import Verdict


@dataclass
class Spoken:
    text: str
    start_ms: float
    audio: SentenceAudio
    """Still growing while the sentence streams in: its duration is read when asked."""

    @property
    def duration_ms(self) -> float:
        return self.audio.duration_ms


class SentenceAudio:
    """One sentence's audio, growing while its synthesis streams in.

    Chunks are cut on one time grid: chunk k covers the same milliseconds at
    every output rate, so subscribers at different rates hear the same audio
    under the same sequence numbers. Each chunk is resampled on its own from
    the source samples around it, on the same sample positions a
    whole-sentence resampling would use, so chunks join without seams.
    """

    def __init__(self, chunk_ms: int) -> None:
        self._chunk_ms = chunk_ms
        self._pcm = bytearray()
        self.sample_rate = 0
        self.finished = False
        self.error: BaseException | None = None
        self._grown = asyncio.Event()
        self._done = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        """The synthesis filling it (cancelled when nobody is left to listen)."""
        self.text: str | None = None
        """What is actually said (the safe reply when moderation blocked the sentence)."""

    # ---------------------------------------------------------- producer side
    def append(self, segment: AudioSegment) -> None:
        if not segment.pcm16:
            return
        if not self.sample_rate:
            self.sample_rate = segment.sample_rate
        if segment.sample_rate == self.sample_rate:
            pcm = segment.pcm16
        else:
            # numpy (~4 MB per session process) is loaded when audio first needs it, not at import
            from actors.audio import resample_pcm16

            pcm = resample_pcm16(segment.pcm16, segment.sample_rate, self.sample_rate)
        self._pcm.extend(pcm[: len(pcm) - len(pcm) % 2])
        self._grown.set()

    def finish(self, error: BaseException | None = None) -> None:
        if self.finished:
            return
        self.finished, self.error = True, error
        self._grown.set()
        self._done.set()

    async def wait_finished(self) -> None:
        await self._done.wait()

    # ---------------------------------------------------------- player side
    @property
    def samples(self) -> int:
        return len(self._pcm) // 2

    @property
    def duration_ms(self) -> float:
        return self.samples / self.sample_rate * 1000.0 if self.sample_rate else 0.0

    def _edge(self, k: int) -> float:
        """Source sample position where chunk k starts."""
        return k * self._chunk_ms * self.sample_rate / 1000.0

    def ready(self, k: int) -> bool:
        """Chunk k can be cut: its source samples (and the one after, for
        interpolation) are here, or the sentence is done and k is in it."""
        if not self.sample_rate:
            return False
        if self.finished:
            return self._edge(k) < self.samples
        return self._edge(k + 1) + 1 < self.samples

    async def wait_chunk(self, k: int) -> bool:
        """Wait until chunk k can be cut; False when the sentence ended before it."""
        while not self.ready(k):
            if self.finished:
                return False
            self._grown.clear()
            await self._grown.wait()
        return True

    def chunk_duration_ms(self, k: int) -> float:
        end = min(self._edge(k + 1), float(self.samples))
        return max(0.0, (end - self._edge(k)) / self.sample_rate * 1000.0)

    def chunk(self, rate: int, k: int) -> bytes:
        src_rate = self.sample_rate
        last = self.finished and self._edge(k + 1) >= self.samples
        if rate == src_rate:
            start, end = round(self._edge(k)), (self.samples if last else round(self._edge(k + 1)))
            return bytes(self._pcm[start * 2:end * 2])
        out_start = round(k * self._chunk_ms * rate / 1000)
        out_end = (round(self.samples * rate / src_rate) if last
                   else round((k + 1) * self._chunk_ms * rate / 1000))
        if out_end <= out_start:
            return b""
        import numpy as np  # when first needed: see `append`

        positions = np.arange(out_start, out_end) * (src_rate / rate)
        first = int(positions[0])
        stop = min(self.samples, int(positions[-1]) + 2)
        window = np.frombuffer(self._pcm, dtype=np.int16, count=stop - first, offset=first * 2).astype(np.float32)
        out = np.interp(positions, np.arange(first, stop), window)
        return np.clip(np.round(out), -32768, 32767).astype(np.int16).tobytes()


@dataclass
class Playback:
    """One turn's reply being spoken."""

    turn: int
    splitter: SentenceSplitter = field(default_factory=SentenceSplitter)
    emotions: EmotionFilter = field(default_factory=EmotionFilter)
    lines: MarkdownLines = field(default_factory=MarkdownLines)
    checks: list[asyncio.Task[Verdict]] = field(default_factory=list)
    """Moderation post-checks, started as sentences arrive so their latency overlaps."""
    safe_said: bool = False
    """The safe reply was said this turn: later blocked sentences are dropped."""
    checked: bool = False
    """The text coming in passed moderation already (`TextDelta.checked`)."""
    queue: asyncio.Queue[tuple[str, SentenceAudio | None] | None] = field(default_factory=asyncio.Queue)
    player: asyncio.Task[None] | None = None
    synths: list[asyncio.Task[None]] = field(default_factory=list)
    """This turn's synthesis tasks, in sentence order; each waits for the one before."""
    stream: TTSStream | None = None
    """The provider's stream for this reply, opened with its first synthesised sentence."""
    router: asyncio.Task[None] | None = None
    segments: dict[int, SentenceAudio] = field(default_factory=dict)
    """Stream segment → the sentence its audio fills."""
    started: bool = False
    clock_start: float | None = None
    paced: bool = True
    """Whether the last chunk was paced: when pacing comes back (a listener
    joined an HTTP reply) the clock restarts instead of sleeping off the lead."""
    sent_ms: float = 0.0
    spoken: list[Spoken] = field(default_factory=list)
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
