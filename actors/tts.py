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
what was actually said. A reply in flight, its sentences' audio and its clock are
actors/tts_playback.py's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from actors.config import TTSConfig
from actors.events import AudioChunk, ErrorCode, LLMEmotion, TTSAudioEnd, TTSSentence, TTSStart, TTSStop
from actors.mailbox import Child, Message
from actors.providers.base import TTS, TTSStream
from actors.text import has_words, speakable
from actors.tts_playback import Playback, SentenceAudio, Spoken

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


class TTSChild(Child):
    name = "tts"

    def __init__(self, core: SessionCore, tts: TTS, config: TTSConfig, *, moderator: Moderator | None = None,
                 quick_replies: QuickReplies | None = None, safe_reply: str | None = None) -> None:
        super().__init__(core.child_crashed)
        self._core = core
        self._tts = tts
        self._cfg = config
        self._turns: dict[int, Playback] = {}
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
            pb = self._turns[turn] = Playback(turn)
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

    def _enqueue(self, pb: Playback, sentence: str) -> None:
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
        audio = SentenceAudio(self._cfg.chunk_ms)
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
                                audio: SentenceAudio, pb: Playback | None = None,
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

    def _stream_of(self, pb: Playback) -> TTSStream:
        """The reply's stream, opened on first use; its audio is routed to the sentences."""
        if pb.stream is None:
            pb.stream = stream = self._tts.open_stream()
            pb.router = asyncio.get_running_loop().create_task(self._route(pb, stream))
        return pb.stream

    async def _route(self, pb: Playback, stream: TTSStream) -> None:
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

    def _close_stream(self, pb: Playback) -> None:
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

    async def _play_quick(self, phrase: str, audio: SentenceAudio) -> None:
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

    async def _play(self, pb: Playback) -> None:
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

    async def _play_sentence(self, pb: Playback, sentence: str, audio: SentenceAudio) -> None:
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
                pb.spoken.append(Spoken(said, pb.sent_ms, audio))
            await self._pace(pb)
            if pb.seq == 0:
                self._core.timer(pb.turn).first_audio = time.time()
            self._emit_chunk(pb, audio, k)
            pb.seq += 1
            pb.sent_ms += audio.chunk_duration_ms(k)
            k += 1

    def _emit_chunk(self, pb: Playback, audio: SentenceAudio, k: int) -> None:
        """Chunk k to every speaking subscriber, made once per output rate."""
        turn, seq = pb.turn, pb.seq
        self._core.emit_per_rate(
            lambda rate: AudioChunk(turn_id=turn, seq=seq, sample_rate=rate, pcm16=audio.chunk(rate, k)),
            speakers_only=True)

    async def _pace(self, pb: Playback) -> None:
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
