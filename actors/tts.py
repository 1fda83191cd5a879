"""TTS child: sentences out of the reply stream, synthesised one by one,
paced out in real time, cancelled at once on interruption.

Synthesis of sentence k+1 runs while sentence k plays. Audio is sent at most
`prebuffer_ms` ahead of the listener, so an interruption drops everything the
listener has not heard yet, and the child can tell which words were heard.

Output settings belong to each subscriber (`OutputPrefs`), not to the
session: a sentence is synthesised only while some subscriber wants speech,
it is resampled once per distinct output rate, and the session paces audio in
real time while any speaking subscriber wants pacing (docs/architecture.md).

What is said is not always what the LLM wrote: emotion tags come out (the
turn's emotion goes out once as `llm.emotion`), markdown, code, URLs and
emoji are not read aloud (`speakable`), a sentence moderation blocks becomes
the persona's safe reply (said once per turn; later blocked sentences are
dropped; text the dialogue already checked, `TextDelta.checked`, is not
checked again: agent/reply_gate.py), and a sentence that is a quick-reply
phrase plays from the phrase cache without a TTS call. `tts.sentence` and the heard text follow
what was actually said.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from actors.config import TTSConfig
from actors.events import AudioChunk, ErrorCode, LLMEmotion, TTSAudioEnd, TTSSentence, TTSStart, TTSStop
from actors.mailbox import Child, Message
from actors.providers.base import TTS, AudioSegment, TTSStream
from actors.text import EmotionFilter, MarkdownLines, SentenceSplitter, has_words, speakable

if TYPE_CHECKING:
    from actors.agent.moderation import Moderator, Verdict
    from actors.agent.quick_replies import QuickReplies
    from actors.session_core import SessionCore

log = logging.getLogger(__name__)
EMOTION_TURNS_KEPT = 64
"""Turns remembered as having had their emotion sent (one per turn)."""

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
    checked: bool = False
    """Moderation's post-check already passed it (the dialogue's reply gate)."""
    phrase: bool = False
    """Said by the server (greeting, safe reply, filler): when it is a quick
    reply it is one sentence, played from the cache, even if it has several."""


@dataclass
class TextEnd(Message):
    pass


@dataclass
class _Spoken:
    text: str
    start_ms: float
    audio: _SentenceAudio
    """Still growing while the sentence streams in: its duration is read when asked."""

    @property
    def duration_ms(self) -> float:
        return self.audio.duration_ms


class _SentenceAudio:
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
class _Playback:
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
    queue: asyncio.Queue[tuple[str, _SentenceAudio | None] | None] = field(default_factory=asyncio.Queue)
    player: asyncio.Task[None] | None = None
    synths: list[asyncio.Task[None]] = field(default_factory=list)
    """This turn's synthesis tasks, in sentence order; each waits for the one before."""
    stream: TTSStream | None = None
    """The provider's stream for this reply, opened with its first synthesised sentence."""
    router: asyncio.Task[None] | None = None
    segments: dict[int, _SentenceAudio] = field(default_factory=dict)
    """Stream segment → the sentence its audio fills."""
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

    def __init__(self, core: SessionCore, tts: TTS, config: TTSConfig, *, moderator: Moderator | None = None,
                 quick_replies: QuickReplies | None = None, safe_reply: str | None = None) -> None:
        super().__init__(core.child_crashed)
        self._core = core
        self._tts = tts
        self._cfg = config
        self._turns: dict[int, _Playback] = {}
        self._moderator = moderator if moderator is not None and moderator.active else None
        self._quick = quick_replies
        self._safe_reply = safe_reply or (moderator.safe_reply if moderator is not None else
                                          "I'd rather not talk about that.")
        if self._quick is not None:
            self._quick.add(self._safe_reply)
        self._emotion_turns: set[int] = set()
        self._closing: set[asyncio.Task[None]] = set()
        self.synthesized = 0
        """Sentences sent to the TTS provider (stats: text-only sessions send none)."""
        self.quick_hits = 0
        """Sentences played from the quick-reply cache without a TTS call."""
        self.moderated = 0
        """Sentences moderation blocked (replaced by the safe reply or dropped)."""

    def set_provider(self, tts: TTS) -> None:
        """Sentences from now on go to this provider (a persona's voice)."""
        self._tts = tts

    def set_replies(self, quick_replies: QuickReplies | None, safe_reply: str | None = None) -> None:
        """A new persona's quick-reply phrases (keyed to its voice) and safe reply, from the next sentence on."""
        self._quick = quick_replies
        if safe_reply:
            self._safe_reply = safe_reply
        if self._quick is not None:
            self._quick.add(self._safe_reply)

    @property
    def safe_reply(self) -> str:
        """What a moderation block says in this session (persona, then config)."""
        return self._safe_reply

    @property
    def quick_replies(self) -> QuickReplies | None:
        """The persona's quick-reply phrases (the dialogue's filler and error phrase)."""
        return self._quick

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
        if isinstance(message, TextDelta) and message.phrase and self._quick is not None \
                and self._quick.match(message.text.strip()) is not None:
            pb.checked = message.checked
            for sentence in pb.splitter.feed(pb.lines.flush()) + pb.splitter.flush():  # what came before goes first
                self._enqueue(pb, sentence)
            self._enqueue(pb, message.text.strip())
        elif isinstance(message, TextDelta):
            pb.checked = message.checked
            text, emotion = pb.emotions.feed(message.text)
            if emotion:
                self.note_emotion(turn, emotion)
            for sentence in pb.splitter.feed(pb.lines.feed(text)):
                self._enqueue(pb, sentence)
        elif isinstance(message, TextEnd):
            text, emotion = pb.emotions.flush()
            if emotion:
                self.note_emotion(turn, emotion)
            for sentence in pb.splitter.feed(pb.lines.feed(text) + pb.lines.flush()) + pb.splitter.flush():
                self._enqueue(pb, sentence)
            pb.queue.put_nowait(None)

    def note_emotion(self, turn: int, emotion: str) -> None:
        """The turn's emotion, sent once as `llm.emotion` whoever finds it
        first (the LLM's own `emotion` field, a tag or an emoji in its text)."""
        if turn in self._emotion_turns:
            return
        self._emotion_turns.add(turn)
        if len(self._emotion_turns) > EMOTION_TURNS_KEPT:
            self._emotion_turns.discard(min(self._emotion_turns))
        self._core.emit(LLMEmotion(turn_id=turn, emotion=emotion))

    def _enqueue(self, pb: _Playback, sentence: str) -> None:
        """Queue a sentence to play; synthesise it only if a subscriber wants
        speech now (a text-only turn must not spend TTS time). Only its
        speakable words go on; a sentence with none (an emoji, a URL) is not said."""
        sentence = speakable(sentence)
        if not has_words(sentence):
            return
        if not self._core.wants_speech:
            pb.queue.put_nowait((sentence, None))
            return
        timer = self._core.timer(pb.turn)
        if timer.first_sentence is None:
            timer.first_sentence = time.time()
        audio = _SentenceAudio(self._cfg.chunk_ms)
        previous = pb.synths[-1] if pb.synths else None
        loop = asyncio.get_running_loop()
        check = None
        if self._moderator is not None and not pb.checked:
            check = loop.create_task(self._moderator.check_sentence(sentence))
            pb.checks.append(check)
        audio.task = loop.create_task(self._synthesize_after(previous, sentence, audio, pb, check))
        pb.synths.append(audio.task)
        pb.queue.put_nowait((sentence, audio))

    async def _synthesize_after(self, previous: asyncio.Task[None] | None, sentence: str,
                                audio: _SentenceAudio, pb: _Playback | None = None,
                                check: asyncio.Task[Verdict] | None = None) -> None:
        """One sentence at a time, in order: run side by side they would all
        share the CPU and the first sentence (the one the listener waits for)
        would come last. Audio streams into `audio` as the provider makes it;
        cancelling this task (barge-in) closes the provider's stream, which
        stops a cloud synthesis at once.

        Synthesis goes through the reply's `TTSStream` (one per turn): the
        sentence is pushed as a segment, and its audio comes back through
        `_route`.

        In order too, the moderation verdict (its check started when the
        sentence arrived) decides what is said: the sentence, the safe reply
        (first block of the turn) or nothing (later blocks)."""
        if previous is not None:
            await asyncio.wait([previous])
        if check is not None and await self._blocked(check):
            self.moderated += 1
            if pb is None or pb.safe_said:
                audio.finish()  # never announced: it made no audio
                return
            pb.safe_said = True
            sentence = self._safe_reply
        audio.text = sentence
        if self._quick is not None and (phrase := self._quick.match(sentence)) is not None:
            await self._play_quick(phrase, audio)
            return
        self.synthesized += 1
        stream = self._stream_of(pb)
        stream.push_text(sentence)
        pb.segments[stream.flush()] = audio
        try:
            await audio.wait_finished()
        except asyncio.CancelledError:  # nobody will hear it: stop the provider now, not at the sentence's end
            self._close_stream(pb)
            raise

    def _stream_of(self, pb: _Playback) -> TTSStream:
        """The reply's stream, opened on first use; its audio is routed to the sentences."""
        if pb.stream is None:
            pb.stream = stream = self._tts.open_stream()
            pb.router = asyncio.get_running_loop().create_task(self._route(pb, stream))
        return pb.stream

    async def _route(self, pb: _Playback, stream: TTSStream) -> None:
        try:
            async for piece in stream:
                audio = pb.segments.get(piece.segment)
                if audio is None:
                    continue
                if piece.final:
                    del pb.segments[piece.segment]
                    audio.finish(piece.error)
                elif piece.audio is not None:
                    audio.append(piece.audio)
        finally:
            if pb.stream is stream:  # ended under its sentences (not closed on purpose): they fail, none hangs
                for audio in pb.segments.values():
                    audio.finish(RuntimeError("the speech synthesis stream ended early"))
                pb.segments.clear()

    def _close_stream(self, pb: _Playback) -> None:
        """Cancel the reply's stream (barge-in, nobody listening); a later
        sentence of the turn opens a new one."""
        stream, router, pb.stream, pb.router = pb.stream, pb.router, None, None
        for audio in pb.segments.values():
            audio.finish()
        pb.segments.clear()
        if stream is not None:
            closing = asyncio.get_running_loop().create_task(stream.cancel())
            self._closing.add(closing)  # held until done: the loop keeps only a weak reference
            closing.add_done_callback(self._closing.discard)
        if router is not None:
            router.cancel()

    async def _blocked(self, check: asyncio.Task[Verdict]) -> bool:
        try:
            return (await check).blocked
        except Exception:  # a bug in a check must not silence the reply; the operator sees it
            log.exception("session %s: a moderation check failed", self._core.session_id)
            return False

    async def _play_quick(self, phrase: str, audio: _SentenceAudio) -> None:
        """A quick-reply phrase: its cached audio, synthesised on first use only."""
        assert self._quick is not None
        made = self._quick.cache.stats["synthesized"]
        try:
            segment = await self._quick.audio(self._tts, phrase)
        except Exception as e:
            audio.finish(e)
            return
        finally:
            if self._quick.cache.stats["synthesized"] > made:
                self.synthesized += 1
        if self._quick.cache.stats["synthesized"] == made:
            self.quick_hits += 1
            self._quick.hits += 1
        audio.append(segment)
        audio.finish()

    async def _play(self, pb: _Playback) -> None:
        while (item := await pb.queue.get()) is not None:
            sentence, audio = item
            if audio is None or not self._core.wants_speech:  # nobody listens: skip, do not wait
                if audio is not None and audio.task is not None:
                    audio.task.cancel()
                continue
            await self._play_sentence(pb, sentence, audio)
            if audio.error is not None:
                self._core.emit_error(ErrorCode.TTS_FAILED, f"could not speak a sentence: {audio.error}", pb.turn)
        if pb.stream is not None:
            pb.stream.end_input()
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
        """Chunks out as soon as each is synthesised and due; a sentence that
        never produced audio is not announced."""
        k = 0
        while await audio.wait_chunk(k):
            if k == 0:
                if not pb.started:
                    pb.started = True
                    self._core.emit_per_rate(lambda rate: TTSStart(turn_id=pb.turn, sample_rate=rate))
                said = audio.text or sentence
                self._core.emit(TTSSentence(turn_id=pb.turn, text=said))
                pb.spoken.append(_Spoken(said, pb.sent_ms, audio))
            await self._pace(pb)
            if pb.seq == 0:
                self._core.timer(pb.turn).first_audio = time.time()
            self._emit_chunk(pb, audio, k)
            pb.seq += 1
            pb.sent_ms += audio.chunk_duration_ms(k)
            k += 1

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
            for task in (*pb.checks, *pb.synths):
                task.cancel()
            self._close_stream(pb)
            if pb.started:
                self._core.emit(TTSStop(turn_id=turn, reason="interrupted",
                                        stream_ms=self._core.interrupt_stream_ms))

    async def stop(self) -> None:
        self.on_interrupt(max(self._turns, default=-1))
        await super().stop()
