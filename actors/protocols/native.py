"""The native protocol (docs/protocol.md, version 1): JSON control messages,
binary audio frames (PCM16 or Opus) in, session events as JSON and reply
audio as tagged binary frames out."""

from __future__ import annotations

import struct
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from actors import safe_json
from actors.protocols.base import (
    MAX_TEXT_CHARS, SESSION_ID_PATTERN, Action, Audio, HistoryRequest, Hello, Interrupt, Listen, Outgoing,
    ProtocolAdapter, ProtocolError, Reply, Text, echo_id, parse_json_message, short_repr,
)

PROTOCOL_VERSION = 1
AUDIO_HEADER = struct.Struct(">2sBBII")
"""Reply audio frame header: magic b"VA", version, codec (1 PCM16, 2 Opus),
turn id, chunk sequence number; the payload follows."""
CODEC_PCM16, CODEC_OPUS = 1, 2


class AudioFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    format: Literal["pcm16", "opus"] = "pcm16"
    sample_rate: Literal[16000] = 16000
    channels: Literal[1] = 1
    frame_ms: int = Field(60, ge=10, le=1000)


class OutputFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    format: Literal["pcm16", "opus"] = "pcm16"
    sample_rate: Literal[8000, 16000, 24000, 48000] | None = None


class HelloMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["hello"]
    version: int = PROTOCOL_VERSION
    session_id: str | None = Field(None, max_length=64, pattern=SESSION_ID_PATTERN)
    persona: str | None = Field(None, max_length=48, pattern=r"^[a-z0-9][a-z0-9_-]{0,47}$")
    greet: bool = False
    audio: AudioFormat = AudioFormat()
    output: OutputFormat = OutputFormat()


def _json(msg: dict[str, Any]) -> str:
    return safe_json.dumps(msg, compact=True)


def pack_audio(codec: int, turn_id: int, seq: int, payload: bytes) -> bytes:
    return AUDIO_HEADER.pack(b"VA", PROTOCOL_VERSION, codec, turn_id, seq) + payload


def unpack_audio(frame: bytes) -> tuple[int, int, int, bytes]:
    magic, _version, codec, turn, seq = AUDIO_HEADER.unpack_from(frame)
    if magic != b"VA":
        raise ValueError("not a voice-actors audio frame")
    return codec, turn, seq, frame[AUDIO_HEADER.size:]


class NativeProtocol(ProtocolAdapter):
    name = "native"

    def __init__(self, max_frame_bytes: int) -> None:
        self._max_frame = max_frame_bytes
        self._hello: HelloMessage | None = None
        self._decoder: Any = None
        self._encoder: Any = None
        self._encoder_turn = -1
        self._opus_seq = 0

    # ----------------------------------------------------------- inbound
    def on_text(self, data: str) -> list[Action]:
        kind, msg = parse_json_message(data, expect_hello=self._hello is None)
        if self._hello is None:
            return [self._on_hello(msg)]
        if kind == "text":
            text = msg.get("text")
            if not isinstance(text, str) or len(text) > MAX_TEXT_CHARS:
                raise ProtocolError("protocol.bad_message",
                                    f"'text' needs a string field 'text' of at most {MAX_TEXT_CHARS} characters")
            return [Text(text)]
        if kind == "interrupt":
            return [Interrupt("client")]
        if kind == "listen":
            state, mode = msg.get("state"), msg.get("mode", "auto")
            if state not in ("start", "stop") or mode not in ("auto", "manual", "realtime"):
                raise ProtocolError("protocol.bad_message",
                                    "'listen' needs state start|stop and mode auto|manual|realtime")
            return [Listen(state, mode)]
        if kind == "ping":
            return [Reply(_json({"type": "pong", "id": echo_id(msg.get("id"))}))]
        if kind == "history":
            return [HistoryRequest()]
        if kind == "hello":
            raise ProtocolError("protocol.bad_message", "'hello' was already received")
        raise ProtocolError("protocol.unknown_type", f"unknown message type {short_repr(kind)}")

    def _on_hello(self, msg: dict[str, Any]) -> Hello:
        try:
            hello = HelloMessage.model_validate(msg)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ProtocolError("protocol.bad_hello", f"bad hello: {where}: {first['msg']}", fatal=True) from None
        if hello.version != PROTOCOL_VERSION:
            raise ProtocolError("protocol.version", f"protocol version {hello.version} is not supported; "
                                f"this server speaks {PROTOCOL_VERSION}", fatal=True)
        self._hello = hello
        if hello.audio.format == "opus":
            from actors.protocols.opus import OpusDecoder

            self._decoder = OpusDecoder(16000)
        return Hello(session_id=hello.session_id, output_sample_rate=hello.output.sample_rate, persona=hello.persona,
                     greet=hello.greet)

    def on_binary(self, data: bytes) -> list[Action]:
        if self._hello is None:
            raise ProtocolError("protocol.hello_required", "send 'hello' before audio", fatal=True)
        if len(data) > self._max_frame:
            raise ProtocolError("audio.frame_too_large",
                                f"audio frame of {len(data)} bytes; the limit is {self._max_frame}")
        if self._decoder is not None:
            from actors.protocols.opus import OpusDecodeError

            try:
                return [Audio(self._decoder.decode(data))]
            except OpusDecodeError as e:
                raise ProtocolError("audio.bad_opus", f"could not decode an Opus packet: {e}") from None
        if not data:
            raise ProtocolError("audio.empty", "empty audio frame")
        if len(data) % 2:
            raise ProtocolError("audio.odd_length", f"PCM16 frame of {len(data)} bytes; it must be even")
        return [Audio(data)]

    # ----------------------------------------------------------- outbound
    def hello_reply(self, session_id: str, resumed: bool, output_sample_rate: int) -> list[Outgoing]:
        assert self._hello is not None
        out_format = self._hello.output.format
        if out_format == "opus":
            from actors.protocols.opus import OpusEncoder

            self._encoder = OpusEncoder(output_sample_rate, frame_ms=60)
        return [_json({
            "type": "hello", "version": PROTOCOL_VERSION, "session_id": session_id, "resumed": resumed,
            "audio_in": self._hello.audio.model_dump(),
            "audio_out": {"format": out_format, "sample_rate": output_sample_rate, "channels": 1},
        })]

    @property
    def wants_output_rate(self) -> int | None:
        return self._hello.output.sample_rate if self._hello else None

    def encode(self, event: Any) -> list[Outgoing]:
        if event.type == "tts.audio":
            if self._encoder is None:
                return [pack_audio(CODEC_PCM16, event.turn_id, event.seq, event.pcm16)]
            return self._opus(event.turn_id, self._encoder.encode(event.pcm16))
        out: list[Outgoing] = []
        if event.type in ("tts.audio_end", "tts.stop") and self._encoder is not None:
            if event.type == "tts.audio_end" or event.reason == "done":
                out.extend(self._opus(event.turn_id, self._encoder.flush()))  # the tail, while it can still play
            else:  # drop the cut turn's buffered tail
                self._encoder.reset()
        out.append(_json(event.model_dump(mode="json")))
        return out

    def _opus(self, turn: int, packets: list[bytes]) -> list[Outgoing]:
        if turn != self._encoder_turn:
            self._encoder_turn, self._opus_seq = turn, 0
        frames = []
        for p in packets:
            frames.append(pack_audio(CODEC_OPUS, turn, self._opus_seq, p))
            self._opus_seq += 1
        return frames
