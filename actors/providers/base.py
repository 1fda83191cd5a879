"""The four provider interfaces a session depends on: VAD, STT, LLM, TTS.

Sessions only ever see these classes, so a cloud vendor, a local model behind a
pool actor, or a test fake plug in beside each other without the session
knowing which one it talks to.
"""

from __future__ import annotations

import abc
import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel

SAMPLE_RATE = 16000
"""Every session works on PCM16 mono at this rate; protocol adapters convert."""


class ProviderError(Exception):
    """A provider failed; `code` is the stable error code sent to the client.

    `retryable` marks a failure a second attempt may cure (a 429, a 5xx, a
    refused connection), with the server's `retry_after_s` when it gave one;
    the retry wrapper (adapters/retry.py) acts on it, nothing else does."""

    def __init__(self, code: str, message: str, *, retryable: bool = False,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable
        self.retry_after_s = retry_after_s

    def __reduce__(self) -> tuple[object, ...]:
        # keeps the code when it crosses a process boundary (a pool actor's call)
        return (_rebuild_provider_error, (type(self), self.code, self.message, self.retryable, self.retry_after_s))


def _rebuild_provider_error(cls: type[ProviderError], code: str, message: str, retryable: bool,
                            retry_after_s: float | None) -> ProviderError:
    return cls(code, message, retryable=retryable, retry_after_s=retry_after_s)


# --------------------------------------------------------------------- VAD
class VAD(abc.ABC):
    """Frame classifier with stream state, one instance per session.

    VAD runs on every 30 ms frame, so it lives in the session process: a
    cross-process call per frame would cost more than the model itself.
    """

    frame_ms: int = 30

    @abc.abstractmethod
    def is_speech(self, frame: bytes) -> bool:
        """Classify one frame of exactly `frame_ms` of PCM16 at 16 kHz."""

    def reset(self) -> None:
        """Forget stream state between unrelated recordings."""


# --------------------------------------------------------------------- STT
class STT(abc.ABC):
    """Speech to text. Batch decoders implement `transcribe` and get a
    stream for free (`BufferedSTTStream`); streaming services also override
    `open_stream` to send audio as it arrives."""

    @abc.abstractmethod
    async def transcribe(self, pcm16: bytes) -> str:
        """Transcribe a whole utterance of PCM16 mono 16 kHz."""

    def open_stream(self, interim_every_s: float = 0.0) -> STTStreamSession:
        """A stream for one utterance. `interim_every_s` rations interim
        results where each costs a whole decode (a batch decoder; 0 = none);
        a streaming service sends interims on its own and ignores it.
        Must not raise: a stream that cannot work fails through `events()`."""
        return BufferedSTTStream(self, interim_every_s)


@dataclass(frozen=True)
class SpeechEvent:
    """One result of a recognition stream. `text` is always the utterance's
    words so far (finished sentences plus the current guess), so a listener
    can show it as it is.

    - `interim`: the guess changed;
    - `final`: a sentence closed (its words will not change any more);
    - `end`: the input ended and this is the transcript (always the last event).
    """

    kind: Literal["interim", "final", "end"]
    text: str


class STTStreamSession(abc.ABC):
    """One utterance being recognised while it is spoken: push audio in,
    iterate `events()` (one consumer), call `end_input()` at end of speech;
    the `end` event then carries the transcript. A provider failure is raised
    by `events()` (never by `push`), as a `ProviderError`."""

    live: bool = False
    """True when the recogniser sends interim results on its own (a streaming
    service), so the latest interim is worth acting on (preemptive
    generation); False for a batch decoder, whose interims are rationed and
    may lag the audio."""

    @abc.abstractmethod
    async def push(self, pcm16: bytes) -> None: ...

    @abc.abstractmethod
    async def end_input(self) -> None:
        """No more audio: the stream produces its `end` event (returns at once)."""

    @abc.abstractmethod
    def events(self) -> AsyncIterator[SpeechEvent]:
        """Interim and final results, then `end`; raises ProviderError on failure;
        ends without `end` after `cancel()`."""

    async def cancel(self) -> None:
        """Abandon the utterance (the user was cut off or left)."""

    async def speech_paused(self) -> None:
        """A hint from the session's VAD: the speaker paused (`vad.pause_ms`),
        the utterance may be ending. A batch adapter decodes the audio so far
        now, so the transcript can be ready when the end is decided."""

    async def speech_resumed(self) -> None:
        """A hint: speech again after a pause; what was decoded at the pause is stale."""

    async def finish(self) -> str:
        """End the input and wait for the transcript, skipping interims (for
        callers that want only the words: `transcribe`, tests). Use it or
        `events()`, not both."""
        await self.end_input()
        async for event in self.events():
            if event.kind == "end":
                return event.text
        raise ProviderError("stt.failed", "the speech recognition stream ended without a transcript")


class QueuedSTTStream(STTStreamSession):
    """The event side of a stream whose results arrive from callbacks or
    tasks: they are put here, `events()` hands them out in order."""

    def __init__(self) -> None:
        self._results: asyncio.Queue[SpeechEvent | BaseException | None] = asyncio.Queue()
        self._over = False

    @property
    def over(self) -> bool:
        """The stream has ended, failed or been cancelled: nothing more will come."""
        return self._over

    def _put(self, event: SpeechEvent) -> None:
        if not self._over:
            self._results.put_nowait(event)
            self._over = event.kind == "end"

    def _put_error(self, error: BaseException) -> None:
        if not self._over:
            self._over = True
            self._results.put_nowait(error)

    def _put_closed(self) -> None:
        if not self._over:
            self._over = True
            self._results.put_nowait(None)

    async def events(self) -> AsyncIterator[SpeechEvent]:
        while (item := await self._results.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.kind == "end":
                return


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


# --------------------------------------------------------------------- LLM
class ToolCall(BaseModel):
    id: str
    name: str
    arguments: dict[str, Any] = {}


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    tool_calls: list[ToolCall] = []
    tool_call_id: str | None = None
    interrupted: bool = False
    """True when the assistant was cut off: `content` is what was heard."""


@dataclass
class LLMChunk:
    """One streamed piece of a reply: text, or a request to run a tool."""

    text: str = ""
    tool_call: ToolCall | None = None
    emotion: str | None = None
    usage: dict[str, int] | None = None
    """Token usage of the reply (prompt, completion, total); only on the last chunk."""


@dataclass
class ToolSpec:
    name: str
    description: str
    parameters: dict[str, Any] = field(default_factory=dict)


class LLM(abc.ABC):
    """A chat model streaming its reply. Tool calls are yielded, not run:
    the dialogue runs them and calls `stream` again with the results, the
    same loop for an OpenAI-compatible model and the local engine."""

    label: str = "llm"

    @abc.abstractmethod
    def stream(self, messages: list[ChatMessage], tools: list[ToolSpec]) -> AsyncIterator[LLMChunk]: ...


# --------------------------------------------------------------------- TTS
@dataclass
class AudioSegment:
    pcm16: bytes
    sample_rate: int


class TTS(abc.ABC):
    """Text to speech.

    A provider implements `synthesize` (one sentence, whole) and, when its
    service streams, `stream` (one sentence's audio as it is made; closing
    it must stop the synthesis: barge-in). Callers speak through
    `open_stream()`: push text in, iterate audio out, cancel at any moment.
    Its default, `SentenceTTSStream`, is the sentence adapter over those two.
    """

    @abc.abstractmethod
    async def synthesize(self, text: str) -> AudioSegment: ...

    async def stream(self, text: str) -> AsyncIterator[AudioSegment]:
        """Pieces of the sentence's audio in order, all at one sample rate."""
        yield await self.synthesize(text)

    def open_stream(self) -> TTSStream:
        """A stream for one reply (must be called on the event loop)."""
        return SentenceTTSStream(self)


@dataclass
class SynthesizedAudio:
    """A piece of a stream's output: audio of segment `segment`, or (`final`)
    the end of that segment, with `error` when it could not be (fully) said."""

    segment: int
    audio: AudioSegment | None = None
    final: bool = False
    error: BaseException | None = None


class TTSStream(abc.ABC):
    """One reply being spoken: text in with `push_text`, cut into segments
    (sentences) by `flush`, `end_input` when the reply is complete; iterate
    the stream for its audio, segment after segment, each ending with a
    `final` piece. `cancel()` stops it at once, mid-sentence: the iteration
    ends and the provider's synthesis is closed."""

    @abc.abstractmethod
    def push_text(self, text: str) -> None: ...

    @abc.abstractmethod
    def flush(self) -> int:
        """Close the current segment (the text pushed since the last flush);
        → its number (0, 1, …), the `segment` of its audio."""

    @abc.abstractmethod
    def end_input(self) -> None:
        """No more text: the remainder is flushed, and the iteration ends after its audio."""

    @abc.abstractmethod
    def __aiter__(self) -> AsyncIterator[SynthesizedAudio]: ...

    @abc.abstractmethod
    async def cancel(self) -> None: ...


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
