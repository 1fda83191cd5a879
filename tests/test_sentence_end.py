"""`vad.sentence_end_ms`: an utterance whose words at the pause end a
sentence closes after a short silence; speech that trails off or goes on
gets the full `vad.end_silence_ms`. The audio buffer alone, its VAD scripted
(loud frames are speech), no Ray."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from actors.audio_buffer import AudioBatch, AudioBuffer, WordsEndASentence
from actors.config import load_config
from actors.providers.base import VAD
from actors.stt_stream import SpeechAudio, SpeechEnded, SpeechPaused, SpeechResumed
from actors.text import ends_a_sentence

FRAME_MS = 30
LOUD, QUIET = b"\x10\x00" * 480, b"\x00\x00" * 480


class LoudIsSpeech(VAD):
    frame_ms = FRAME_MS

    def is_speech(self, frame: bytes) -> bool:
        return frame != QUIET


class Recorder:
    """The session core as the audio buffer sees it: what it is told, and where in the stream."""

    def __init__(self) -> None:
        self.ends: list[int] = []
        self.to_stt: list[Any] = []
        self.stt = self
        self.replying = False

    def post(self, message: Any) -> None:
        self.to_stt.append(message)

    def child_crashed(self, name: str, error: BaseException) -> None:
        raise error

    def on_speech_start(self, stream_ms: int) -> int:
        return 1

    def on_speech_end(self, turn: int, stream_ms: int) -> None:
        self.ends.append(stream_ms)

    def interrupt(self, stream_ms: int) -> None:
        pass


def buffer(sentence_end_ms: int = 300) -> tuple[AudioBuffer, Recorder]:
    config = load_config(env={"VOICE_ACTORS__VAD__END_SILENCE_MS": "600",
                              "VOICE_ACTORS__VAD__PAUSE_MS": "210",
                              "VOICE_ACTORS__VAD__SENTENCE_END_MS": str(sentence_end_ms)})
    core = Recorder()
    return AudioBuffer(core, LoudIsSpeech(), config), core  # type: ignore[arg-type]


async def feed(buf: AudioBuffer, frames: list[bytes]) -> None:
    for frame in frames:  # one frame per batch, as a device streaming in real time
        await buf.handle(AudioBatch(None, [(None, frame)]))


def ms(n: int) -> int:
    return n // FRAME_MS


SPEECH_MS = 900


async def test_finished_words_close_the_utterance_after_the_short_silence():
    buf, core = buffer()
    await feed(buf, [LOUD] * ms(SPEECH_MS) + [QUIET] * ms(240))
    [paused] = [m for m in core.to_stt if isinstance(m, SpeechPaused)]
    assert paused.stream_ms == SPEECH_MS + 210 and not core.ends  # where the pause was heard: vad.pause_ms in
    await buf.handle(WordsEndASentence(1, 1))  # the decode of the pause came in 240 ms into the silence
    assert not core.ends
    await feed(buf, [QUIET] * ms(60))
    assert core.ends == [SPEECH_MS + 300] and isinstance(core.to_stt[-1], SpeechEnded)
    assert buf.ended_on_sentence == 1


async def test_words_that_come_late_close_the_utterance_at_once():
    buf, core = buffer()
    await feed(buf, [LOUD] * ms(SPEECH_MS) + [QUIET] * ms(420))
    await buf.handle(WordsEndASentence(1, 1))
    assert core.ends == [SPEECH_MS + 420] and buf.ended_on_sentence == 1


async def test_speech_that_goes_on_gets_the_full_wait_again():
    buf, core = buffer()
    await feed(buf, [LOUD] * ms(SPEECH_MS) + [QUIET] * ms(240))
    await buf.handle(WordsEndASentence(1, 1))
    await feed(buf, [LOUD] * ms(300) + [QUIET] * ms(570))  # "… and one more thing"
    assert not core.ends
    await feed(buf, [QUIET] * ms(30))
    assert core.ends == [SPEECH_MS + 240 + 300 + 600] and buf.ended_on_sentence == 0


async def test_words_of_an_earlier_pause_do_not_close_a_later_one():
    buf, core = buffer()
    await feed(buf, [LOUD] * ms(SPEECH_MS) + [QUIET] * ms(240) + [LOUD] * ms(300) + [QUIET] * ms(420))
    await buf.handle(WordsEndASentence(1, 1))  # the first pause's decode, come in late
    assert not core.ends
    await feed(buf, [QUIET] * ms(180))
    assert core.ends == [SPEECH_MS + 240 + 300 + 600] and buf.ended_on_sentence == 0


@pytest.mark.parametrize("sentence_end_ms, words", [(300, None), (0, WordsEndASentence(1, 1)), (300, WordsEndASentence(7, 1))])
async def test_without_finished_words_of_this_turn_the_wait_is_end_silence(sentence_end_ms: int, words: Any):
    buf, core = buffer(sentence_end_ms)
    await feed(buf, [LOUD] * ms(SPEECH_MS) + [QUIET] * ms(240))
    if words is not None:
        await buf.handle(words)  # turned off, or another turn's words
    await feed(buf, [QUIET] * ms(330))
    assert not core.ends
    await feed(buf, [QUIET] * ms(30))
    assert core.ends == [SPEECH_MS + 600] and buf.ended_on_sentence == 0


@pytest.mark.parametrize("words, finished", [
    ("Tell me about the Rosetta Stone.", True), ("What is 12 times 7?", True), ("Hello!", True),
    ('He said "stop."', True), ("你好。", True), ("I think...", False), ("I think…", False),
    ("turn off the", False), ("and then,", False), ("", False),
])
def test_which_words_end_a_sentence(words: str, finished: bool):
    assert ends_a_sentence(words) is finished


async def test_the_decode_of_a_pause_says_where_the_pause_was_heard():
    """`stt.partial` of a pause's decode carries the pause's `stream_ms` (a
    client, or bench/load.py, can then tell where a preemptive reply's
    critical path began); other partials carry none."""
    from actors.providers.base import STT
    from actors.stt_stream import SpeechBegan, STTStream

    class Core:
        session_id = "s"

        def __init__(self) -> None:
            self.events: list[Any] = []
            self.pauses: list[tuple[int, str, int]] = []
            self.transcripts: list[str] = []

        def child_crashed(self, name: str, error: BaseException) -> None:
            raise error

        def emit(self, event: Any) -> None:
            self.events.append(event)

        def on_pause(self, turn: int, text: str, pause: int) -> None:
            self.pauses.append((turn, text, pause))

        def on_resume(self, turn: int) -> None:
            pass

        def on_transcript(self, turn: int, text: str) -> None:
            self.transcripts.append(text)

    heard: list[int] = []

    class Words(STT):
        async def transcribe(self, pcm16: bytes) -> str:
            heard.append(len(pcm16))
            return f"{len(pcm16)} bytes."

    core = Core()
    child = STTStream(core, Words(), partial_interval_ms=0)  # type: ignore[arg-type]
    await child.handle(SpeechBegan(1, LOUD * 10))
    await child.handle(SpeechPaused(1, 1, 1110))
    for _ in range(100):
        if core.events:
            break
        await asyncio.sleep(0.01)
    [partial] = core.events
    assert partial.type == "stt.partial" and partial.stream_ms == 1110
    assert core.pauses == [(1, partial.text, 1)]
    await child.handle(SpeechResumed(1))
    await child.handle(SpeechAudio(1, LOUD * 5))
    await child.handle(SpeechEnded(1))
    assert core.transcripts == [f"{len(LOUD) * 15} bytes."]
    assert all(e.stream_ms is None for e in core.events[1:])  # a later decode is not the pause's
