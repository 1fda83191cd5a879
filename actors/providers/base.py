"""The four provider interfaces a session depends on: VAD, STT, LLM, TTS.

Sessions only ever see these classes, so a cloud vendor, a local model behind a
pool actor, or a test fake plug in beside each other without the session
knowing which one it talks to.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel

SAMPLE_RATE = 16000
"""Every session works on PCM16 mono at this rate; protocol adapters convert."""


class ProviderError(Exception):
    """A provider failed; `code` is the stable error code sent to the client."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __reduce__(self) -> tuple[object, ...]:
        # keeps the code when it crosses a process boundary (a pool actor's call)
        return (type(self), (self.code, self.message))


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
    """Speech to text. Batch decoders implement `transcribe`; streaming ones
    also override `open_stream` to push audio as it arrives."""

    @abc.abstractmethod
    async def transcribe(self, pcm16: bytes) -> str:
        """Transcribe a whole utterance of PCM16 mono 16 kHz."""

    def open_stream(self) -> STTStreamSession:
        return BufferedSTTStream(self)


class STTStreamSession(abc.ABC):
    """One utterance being recognised while it is spoken."""

    live: bool = False
    """True when the recogniser sends interim results on its own (a streaming
    service): `partial()` then only reads the latest, costs nothing, and the
    session asks after every push. False for a batch decoder, where a partial
    is a whole re-decode the session rations (`stt.partial_interval_ms`)."""

    @abc.abstractmethod
    async def push(self, pcm16: bytes) -> None: ...

    @abc.abstractmethod
    async def partial(self) -> str | None:
        """A best guess of the words so far, or None if nothing new."""

    @abc.abstractmethod
    async def finish(self) -> str:
        """End of speech: the final transcript."""

    async def cancel(self) -> None:
        """Abandon the utterance (the user was cut off or left)."""

    def transcript_so_far(self) -> str | None:
        """A live recogniser's words so far (finished sentences and the
        current interim), whether or not `partial()` returned them already;
        None when it cannot tell without work."""
        return None


class BufferedSTTStream(STTStreamSession):
    """Streaming on top of a batch decoder: partials re-decode the growing
    buffer (DESIGN §4: Whisper is not a streaming model)."""

    def __init__(self, stt: STT) -> None:
        self._stt = stt
        self._audio = bytearray()
        self._decoded_len = 0

    async def push(self, pcm16: bytes) -> None:
        self._audio.extend(pcm16)

    async def partial(self) -> str | None:
        if len(self._audio) == self._decoded_len:
            return None
        self._decoded_len = len(self._audio)
        return await self._stt.transcribe(bytes(self._audio))

    async def finish(self) -> str:
        return await self._stt.transcribe(bytes(self._audio))


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
    """Text to speech for one sentence at a time.

    `synthesize` answers with the whole sentence; `stream` yields its audio
    as it is made, so playback starts with the first piece. A one-shot
    synthesiser (piper) gets `stream` for free as one piece; a streaming
    service (CosyVoice) overrides it. Closing the stream (barge-in) must stop
    the synthesis it started.
    """

    @abc.abstractmethod
    async def synthesize(self, text: str) -> AudioSegment: ...

    async def stream(self, text: str) -> AsyncIterator[AudioSegment]:
        """Pieces of the sentence's audio in order, all at one sample rate."""
        yield await self.synthesize(text)
