"""AudioBuffer child: numbered frames in, speech start/end and utterance audio out.

Ray async actors may start one-way calls out of order (DESIGN §2), so every
frame carries a sequence number: this child restores the order, drops
duplicates, skips a gap once `reorder_window` later frames have arrived,
cuts the stream into VAD frames and runs the speech state machine with a
pre-roll so the first syllable reaches STT.

Speech opens an utterance after `vad.start_ms`; while a reply is in flight
it must last `vad.min_interruption_ms` first (counting speech frames, with
pauses shorter than `vad.end_silence_ms` allowed), so a cough, a door or a
short noise does not cut the reply. Shorter bursts are dropped: no turn, no
event, only the `ignored` count.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from actors.config import AppConfig
from actors.events import ErrorCode
from actors.mailbox import Child, Message
from actors.providers.base import SAMPLE_RATE, VAD
from actors.stt_stream import SpeechAudio, SpeechBegan, SpeechEnded, SpeechPaused, SpeechResumed

if TYPE_CHECKING:
    from actors.session_core import SessionCore


@dataclass
class ListenControl(Message):
    """Client listening state, ordered with the audio around it.

    `manual` (push to talk): the recording between start and stop is one
    utterance, checked for speech and trimmed of its leading and trailing
    silence at stop (a silent one is `audio.no_speech`, not a turn). `auto` /
    `realtime`: the VAD cuts utterances; stop ends the one in progress and
    ignores audio until start.
    """

    state: str = "start"
    mode: str = "auto"


@dataclass
class WordsEndASentence(Message):
    """The words heard at this turn's pause end a sentence: its silence need
    only last `vad.sentence_end_ms`."""

    pause: int = 0
    """The pause they were heard at (`SpeechPaused.pause`): a later pause's silence is not theirs."""


@dataclass
class ClientsGone(Message):
    """Every client left in the middle of an utterance and none came back
    within `SessionCore.CLIENT_GONE_GRACE_S`."""


@dataclass
class AudioBatch(Message):
    frames: list[tuple[int | None, bytes]] = field(default_factory=list)
    stream: str = ""
    """Sequence numbers count from 0 within a stream: a reconnecting client
    or a second notebook starts a new stream and counts from 0 again."""


class AudioBuffer(Child):
    name = "audio_buffer"

    def __init__(self, core: SessionCore, vad: VAD, config: AppConfig) -> None:
        super().__init__(core.child_crashed)
        self._core = core
        self._vad = vad
        self._frame_ms = vad.frame_ms
        self._frame_bytes = SAMPLE_RATE * self._frame_ms // 1000 * 2
        cfg = config.vad
        self._start_frames = max(1, cfg.start_ms // self._frame_ms)
        self._interrupt_frames = max(self._start_frames, -(-cfg.min_interruption_ms // self._frame_ms))
        self._end_frames = max(1, cfg.end_silence_ms // self._frame_ms)
        self._sentence_end_frames = (min(self._end_frames, max(1, -(-cfg.sentence_end_ms // self._frame_ms)))
                                     if cfg.sentence_end_ms > 0 else self._end_frames)
        self._turn_end_frames = self._end_frames
        """The silence that closes this utterance: `_sentence_end_frames` once its words end a sentence."""
        self._pause_frames = max(1, cfg.pause_ms // self._frame_ms)
        self._paused = False
        self._pauses = 0
        """Pauses in this utterance so far: the words heard at one name it (`WordsEndASentence.pause`)."""
        self._max_frames = int(config.stt.max_utterance_s * 1000 // self._frame_ms)
        self._reorder_window = config.session.reorder_window
        self._preroll: deque[bytes] = deque(maxlen=max(1, cfg.preroll_ms // self._frame_ms))
        # sequencing
        self._stream = ""
        self._expected: int | None = None
        self._held: dict[int, bytes] = {}
        self.duplicates = 0
        self.lost = 0
        # VAD state
        self._pcm = bytearray()
        self._stream_ms = 0
        self._candidate: list[bytes] = []
        """Speech not yet an utterance: up to start_ms, or, while a reply is
        in flight, everything since it was confirmed (then `_held_speech` is True)."""
        self._held_speech = False
        self._held_speech_frames = 0
        self._held_gap = 0
        self._turn: int | None = None
        self._silent = 0
        self._speech_frames = 0
        self._manual = False
        self._recording: list[bytes] = []
        """Push to talk: the frames since listen start (manual mode)."""
        self._speech_at: list[int] = []
        self.trimmed_ms = 0
        """Silence cut from push-to-talk recordings (for stats and tests)."""
        self._listening = True
        self.utterances = 0
        self.ended_on_sentence = 0
        """Utterances closed after `vad.sentence_end_ms`, their words a finished sentence."""
        self.ignored = 0
        """Speech bursts during a reply too short to interrupt it."""

    @property
    def in_speech(self) -> bool:
        return self._turn is not None

    async def handle(self, message: Message) -> None:
        if isinstance(message, ListenControl):
            self._on_listen(message)
            return
        if isinstance(message, WordsEndASentence):
            self._on_finished_words(message.turn_id, message.pause)
            return
        if isinstance(message, ClientsGone):
            self._on_clients_gone()
            return
        assert isinstance(message, AudioBatch)
        if message.stream != self._stream:
            self._new_stream(message.stream)
        for pcm in self._in_order(message.frames):
            self._pcm.extend(pcm)
        outgoing = bytearray()
        while len(self._pcm) >= self._frame_bytes:
            frame = bytes(self._pcm[: self._frame_bytes])
            del self._pcm[: self._frame_bytes]
            outgoing = self._on_frame(frame, outgoing)
        if outgoing and self._turn is not None:
            self._core.stt.post(SpeechAudio(self._turn, bytes(outgoing)))

    def _on_listen(self, msg: ListenControl) -> None:
        if msg.state == "start":
            self._listening = True
            self._manual = msg.mode == "manual"
            if self._manual and self._turn is None:
                self._recording, self._speech_at = [], []
                self._core.interrupt(self._stream_ms)  # the button cuts the reply at once
        elif msg.state == "stop":
            self._listen_stop()

    def _listen_stop(self) -> None:
        if self._manual:
            if len(self._pcm) >= 2:  # the last partial frame belongs to the recording too
                self._recording.append(bytes(self._pcm[: len(self._pcm) // 2 * 2]))
            self._pcm.clear()
            self._finish_recording()
        self._end_with_what_is_buffered()
        self._manual = False
        self._listening = False

    def _on_clients_gone(self) -> None:
        """The words so far end the utterance, as if the speaker had stopped:
        its STT stream closes (held open until the orphan timeout, a cloud
        stream kept the vendor's connection and a key's lease for minutes),
        and the reply is kept in the history for the client's return.
        Listening stays on: a client that comes back streams on."""
        if self._turn is None or self._core.subscribers:
            return
        self._end_with_what_is_buffered()

    def _end_with_what_is_buffered(self) -> None:
        """The utterance in progress, if any, ends now with the audio still
        buffered; speech the VAD was weighing is dropped."""
        tail = bytes(self._pcm) if self._turn is not None else b""
        self._pcm.clear()
        if self._turn is not None:
            if tail:
                self._core.stt.post(SpeechAudio(self._turn, tail))
            self._end()
        self._candidate.clear()
        self._held_speech = False

    def _new_stream(self, stream: str) -> None:
        for seq in sorted(self._held):  # what the old stream left behind, in order
            self._pcm.extend(self._held[seq])
        self._held.clear()
        self._expected = None
        self._stream = stream

    def _in_order(self, frames: list[tuple[int | None, bytes]]) -> list[bytes]:
        released: list[bytes] = []
        for seq, pcm in frames:
            if seq is None:
                released.append(pcm)
                continue
            if self._expected is None:
                # streams count from 0; a later first frame may just be early
                self._expected = 0
            if seq < self._expected or seq in self._held:
                self.duplicates += 1
                continue
            self._held[seq] = pcm
            while True:
                while self._expected in self._held:
                    released.append(self._held.pop(self._expected))
                    self._expected += 1
                if len(self._held) <= self._reorder_window:
                    break
                nxt = min(self._held)  # give up on the gap
                self.lost += nxt - self._expected
                self._expected = nxt
        return released

    def _on_frame(self, frame: bytes, outgoing: bytearray) -> bytearray:
        """One VAD frame; returns audio still to be sent to STT this batch."""
        self._stream_ms += self._frame_ms
        if not self._listening:
            return outgoing
        if self._manual:
            if self._vad.is_speech(frame):
                self._speech_at.append(len(self._recording))
            self._recording.append(frame)
            if len(self._recording) >= self._max_frames:  # held too long: answer what is there
                self._finish_recording()
            return outgoing
        speech = self._vad.is_speech(frame)
        if self._turn is None:
            if self._held_speech:
                self._on_held_frame(frame, speech)
            elif speech:
                self._candidate.append(frame)
                if len(self._candidate) >= self._start_frames:
                    self._on_confirmed()
            else:
                self._preroll.extend(self._candidate)
                self._candidate.clear()
                self._preroll.append(frame)
            return outgoing
        outgoing.extend(frame)
        self._speech_frames += 1
        self._silent = 0 if speech else self._silent + 1
        if self._silent >= self._turn_end_frames or self._speech_frames >= self._max_frames:
            if self._silent < self._end_frames and self._speech_frames < self._max_frames:
                self.ended_on_sentence += 1
            self._core.stt.post(SpeechAudio(self._turn, bytes(outgoing)))
            self._end()
            return bytearray()
        if speech and self._paused:
            self._paused = False
            self._turn_end_frames = self._end_frames  # the words go on: they are no longer a finished sentence
            self._core.stt.post(SpeechResumed(self._turn))
        elif self._silent == self._pause_frames < self._end_frames:
            self._paused = True
            self._pauses += 1
            self._core.stt.post(SpeechAudio(self._turn, bytes(outgoing)))
            self._core.stt.post(SpeechPaused(self._turn, self._pauses, self._stream_ms))
            return bytearray()
        return outgoing

    def _on_finished_words(self, turn: int | None, pause: int) -> None:
        """The words heard at the pause end a sentence: close the utterance
        once its silence has lasted `vad.sentence_end_ms` (now, if it has;
        the decode at the pause often comes later than that). Words of an
        earlier pause, or of an utterance already over, change nothing."""
        if turn is None or turn != self._turn or not self._paused or pause != self._pauses:
            return
        self._turn_end_frames = self._sentence_end_frames
        if self._silent >= self._turn_end_frames and self._turn_end_frames < self._end_frames:
            self.ended_on_sentence += 1
            self._end()

    def _on_confirmed(self) -> None:
        """start_ms of speech: an utterance, at once unless a reply is in
        flight, where it must last min_interruption_ms before it may cut
        the reply (no added latency for an ordinary turn)."""
        if self._core.replying and len(self._candidate) < self._interrupt_frames:
            self._held_speech = True
            self._held_speech_frames = len(self._candidate)
            self._held_gap = 0
        else:
            self._begin()

    def _on_held_frame(self, frame: bytes, speech: bool) -> None:
        """Speech held back during a reply: interrupt once it has lasted long
        enough (or on its next speech frame if the reply has ended meanwhile);
        drop it as noise if it stops first."""
        self._candidate.append(frame)
        if speech:
            self._held_speech_frames += 1
            self._held_gap = 0
        else:
            self._held_gap += 1
        if self._held_speech_frames >= self._interrupt_frames or (speech and not self._core.replying):
            self._begin()
        elif self._held_gap >= self._end_frames or len(self._candidate) >= self._max_frames:
            self.ignored += 1
            self._held_speech = False
            self._preroll.extend(self._candidate)
            self._candidate.clear()

    def _finish_recording(self) -> None:
        """A push-to-talk recording → one utterance of its speech only. Whisper
        hears words in silence ("you", "Thank you."), so a recording without
        speech is no turn, and the silence around speech is cut away, keeping
        `preroll_ms` on each side so no syllable is lost."""
        recording, speech_at = self._recording, self._speech_at
        self._recording, self._speech_at = [], []
        if len(speech_at) < self._start_frames:
            if recording:
                self._core.emit_error(ErrorCode.AUDIO_NO_SPEECH, "no speech was found in the recording")
            return
        pad = self._preroll.maxlen or 1
        first, last = max(0, speech_at[0] - pad), min(len(recording), speech_at[-1] + 1 + pad)
        self.trimmed_ms += (len(recording) - (last - first)) * self._frame_ms
        self._preroll.clear()
        self._candidate = recording[first:last]
        self._begin()
        self._end()

    def _begin(self) -> None:
        self._held_speech = False
        self.utterances += 1
        self._turn = self._core.on_speech_start(self._stream_ms)
        audio = b"".join(self._preroll) + b"".join(self._candidate)
        self._preroll.clear()
        self._candidate.clear()
        self._silent = 0
        self._speech_frames = 0
        self._paused = False
        self._pauses = 0
        self._turn_end_frames = self._end_frames
        self._core.stt.post(SpeechBegan(self._turn, audio))

    def _end(self) -> None:
        turn, self._turn = self._turn, None
        assert turn is not None
        self._core.on_speech_end(turn, self._stream_ms)
        self._core.stt.post(SpeechEnded(turn))
