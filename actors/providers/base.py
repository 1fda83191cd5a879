"""The four provider interfaces a session depends on: VAD, STT, LLM, TTS.

Sessions only ever see these classes, so a cloud vendor, a local model behind a
pool actor, or a test fake plug in beside each other without the session
knowing which one it talks to.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import AsyncIterator
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

    def prepare(self) -> None:
        """Load what the first frame would otherwise load (a model), in the
        calling thread: a session calls it off its event loop when a client
        arrives, so idle sessions stay small and the first speech waits for
        nothing. Thread safe; idempotent."""


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
        from actors.providers.adapters.buffered_stt import BufferedSTTStream  # it builds on this module

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
        from actors.providers.adapters.sentence_tts import SentenceTTSStream  # it builds on this module

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
