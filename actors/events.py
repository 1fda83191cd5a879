"""Typed events: the only thing that leaves a session.

Protocol adapters translate these to wire formats; the session knows none.
Every event carries the session id, the turn it belongs to (0 = none yet)
and a wall-clock timestamp so clients and benchmarks can measure latency.
"""

from __future__ import annotations

import time
from enum import StrEnum
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, Field, TypeAdapter


class ErrorCode(StrEnum):
    """Stable error codes; clients may switch on them, so never rename one."""

    AUDIO_EMPTY = "audio.empty"
    AUDIO_ODD_LENGTH = "audio.odd_length"
    AUDIO_FRAME_TOO_LARGE = "audio.frame_too_large"
    AUDIO_BATCH_TOO_LARGE = "audio.batch_too_large"
    AUDIO_UNSUPPORTED_FORMAT = "audio.unsupported_format"
    AUDIO_BAD_SEQUENCE = "audio.bad_sequence"
    AUDIO_NO_SPEECH = "audio.no_speech"
    TEXT_EMPTY = "text.empty"
    TEXT_TOO_LONG = "text.too_long"
    STT_FAILED = "stt.failed"
    LLM_FAILED = "llm.failed"
    LLM_AUTH = "llm.auth"
    LLM_RATE_LIMITED = "llm.rate_limited"
    LLM_UNAVAILABLE = "llm.unavailable"
    LLM_TIMEOUT = "llm.timeout"
    LLM_UNREACHABLE = "llm.unreachable"
    LLM_BAD_REQUEST = "llm.bad_request"
    LLM_STREAM_ERROR = "llm.stream_error"
    TOOL_FAILED = "tool.failed"
    TTS_FAILED = "tts.failed"
    PROVIDER_FAILOVER = "provider.failover"
    """Not fatal: a provider failed and the next of its chain took over."""
    SESSION_CLOSED = "session.closed"
    SESSION_REPLACED = "session.replaced"
    SESSION_RESTARTED = "session.restarted"
    """Not fatal: the session's actor died and the ingress reopened it from the
    store on the same socket; the turn in flight (this event's turn id) was
    lost, the turns before it were kept."""
    INTERNAL = "internal"


class _Event(BaseModel):
    session_id: str = ""
    turn_id: int = 0
    ts: float = Field(default_factory=time.time)


class SessionStarted(_Event):
    type: Literal["session.started"] = "session.started"
    input_sample_rate: int
    output_sample_rate: int
    persona: str
    """The persona's display name."""
    providers: dict[str, str]
    persona_id: str = ""


class SpeechStart(_Event):
    type: Literal["vad.speech_start"] = "vad.speech_start"
    stream_ms: int
    """Position in the session's input audio where speech was confirmed."""


class SpeechEnd(_Event):
    type: Literal["vad.speech_end"] = "vad.speech_end"
    stream_ms: int


class STTPartial(_Event):
    type: Literal["stt.partial"] = "stt.partial"
    text: str
    stream_ms: int | None = None
    """For the decode of a pause (`stt.decode_at_pause`): where in the input
    audio the pause was heard, as `vad.speech_end`'s. With preemptive
    generation the reply starts on these words, so this, not the end of
    speech, can be where its critical path begins (bench/load.py)."""


class STTFinal(_Event):
    type: Literal["stt.final"] = "stt.final"
    text: str


class LLMDelta(_Event):
    type: Literal["llm.delta"] = "llm.delta"
    text: str


class LLMEmotion(_Event):
    type: Literal["llm.emotion"] = "llm.emotion"
    emotion: str


class ToolCallEvent(_Event):
    type: Literal["tool.call"] = "tool.call"
    name: str
    arguments: dict[str, Any]


class ToolResultEvent(_Event):
    type: Literal["tool.result"] = "tool.result"
    name: str
    result: str


class DeviceRequest(_Event):
    """A JSON-RPC message for the device on this session's socket (MCP
    `tools/list`, `tools/call`, notifications). The xiaozhi adapter sends it
    as `{"type": "mcp", "payload": ...}`; adapters without device tools
    ignore it or pass it on as an event."""

    type: Literal["device.request"] = "device.request"
    payload: dict[str, Any]


class TTSStart(_Event):
    type: Literal["tts.start"] = "tts.start"
    sample_rate: int


class TTSSentence(_Event):
    type: Literal["tts.sentence"] = "tts.sentence"
    text: str


class AudioChunk(_Event):
    type: Literal["tts.audio"] = "tts.audio"
    seq: int
    sample_rate: int
    pcm16: bytes


class TTSAudioEnd(_Event):
    """The last audio chunk of the turn's reply has been sent: adapters flush
    what their encoders still hold now, so the tail has time to play before
    `tts.stop` (which follows once the reply has played out)."""

    type: Literal["tts.audio_end"] = "tts.audio_end"


class TTSStop(_Event):
    type: Literal["tts.stop"] = "tts.stop"
    reason: Literal["done", "interrupted"]
    stream_ms: int | None = None
    """For an interruption by voice: the input position that caused it."""


class ErrorEvent(_Event):
    type: Literal["error"] = "error"
    code: ErrorCode
    message: str


class TurnMetrics(_Event):
    type: Literal["metrics"] = "metrics"
    stt_final_ms: float | None = None
    """End of speech → final transcript."""
    llm_first_token_ms: float | None = None
    """Final transcript (or text input) → first LLM text."""
    tts_first_audio_ms: float | None = None
    """First sentence ready → its first audio chunk."""
    first_audio_ms: float | None = None
    """End of speech (or text input) → first reply audio chunk sent."""
    llm_usage: dict[str, int] | None = None
    """Tokens the LLM spent on this turn (prompt, completion, total), summed over tool rounds."""
    llm_preemptive: bool = False
    """The reply was started at a pause in speech, before the final transcript
    confirmed the words (session.preemptive_generation)."""
    served_by: dict[str, str] | None = None
    """The provider of each stage's failover chain that last answered (stt, llm, tts)."""
    interrupted: bool = False


Event = Annotated[
    Union[
        SessionStarted, SpeechStart, SpeechEnd, STTPartial, STTFinal, LLMDelta, LLMEmotion,
        ToolCallEvent, ToolResultEvent, DeviceRequest, TTSStart, TTSSentence, AudioChunk, TTSAudioEnd, TTSStop, ErrorEvent,
        TurnMetrics,
    ],
    Field(discriminator="type"),
]
EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)
