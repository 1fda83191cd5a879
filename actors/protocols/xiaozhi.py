"""The xiaozhi-esp32 WebSocket protocol: JSON control + binary Opus, 16 kHz
mono 60 ms frames up, Opus at the advertised rate down.

Binary framing follows the firmware's protocol versions: 1 = a bare Opus
packet per frame; 2 = BinaryProtocol2 (big-endian u16 version, u16 type,
u32 reserved, u32 timestamp, u32 payload size); 3 = BinaryProtocol3 (u8
type, u8 reserved, big-endian u16 payload size). Type 0 is Opus audio.
"""

from __future__ import annotations

import math
import struct
from typing import Any

from actors import safe_json
from actors.protocols.base import (
    Action, Audio, DeviceMessage, Greet, Hello, Interrupt, Listen, Outgoing, ProtocolAdapter, ProtocolError,
    MAX_TEXT_CHARS, Text, parse_json_message, short_repr,
)
from actors.protocols.opus import OpusDecodeError, OpusDecoder, OpusEncoder

V2_HEADER = struct.Struct(">HHIII")
V3_HEADER = struct.Struct(">BBH")
TYPE_OPUS = 0
LISTEN_MODES = ("auto", "manual", "realtime")
MAX_REASON_CHARS = 64
MAX_WAKE_WORD_CHARS = 200

EMOTION_EMOJI = {
    "neutral": "😶", "happy": "🙂", "laughing": "😆", "funny": "😂", "sad": "😔", "angry": "😠",
    "crying": "😭", "loving": "😍", "surprised": "😯", "thinking": "🤔", "confused": "🙄",
}


def pack_frame(version: int, payload: bytes, timestamp_ms: int = 0) -> bytes:
    if version == 2:
        return V2_HEADER.pack(2, TYPE_OPUS, 0, timestamp_ms & 0xFFFFFFFF, len(payload)) + payload
    if version == 3:
        return V3_HEADER.pack(TYPE_OPUS, 0, len(payload)) + payload
    return payload


def unpack_frame(version: int, frame: bytes) -> tuple[int, bytes]:
    """→ (message type, payload); raises ValueError on a malformed frame."""
    if version == 2:
        if len(frame) < V2_HEADER.size:
            raise ValueError("frame shorter than the protocol-2 header")
        _v, kind, _r, _ts, size = V2_HEADER.unpack_from(frame)
        payload = frame[V2_HEADER.size:]
    elif version == 3:
        if len(frame) < V3_HEADER.size:
            raise ValueError("frame shorter than the protocol-3 header")
        kind, _r, size = V3_HEADER.unpack_from(frame)
        payload = frame[V3_HEADER.size:]
    else:
        return TYPE_OPUS, frame
    if size != len(payload):
        raise ValueError(f"header says {size} payload bytes, frame has {len(payload)}")
    return kind, payload


def _normalise_phrase(text: str) -> str:
    """Wake words compare without case, blanks or punctuation ("Hi, ESP!" = "hi esp")."""
    return "".join(ch for ch in text.casefold() if ch.isalnum())


def _abort_reason(reason: object) -> str:
    """A short string as sent by the firmware ("wake_word_detected"), else the
    default: the reason is logged and shown, so no client payload goes there."""
    if isinstance(reason, str) and 0 < len(reason) <= MAX_REASON_CHARS:
        return reason
    return "abort"


def _check_audio_params(params: object) -> None:
    """The uplink the device announces must be what we decode: Opus, 16 kHz,
    mono. Wrong types are a bad hello, not a crash in int()."""
    if params is None:
        return
    if not isinstance(params, dict):
        raise ProtocolError("protocol.bad_hello", "audio_params must be an object", fatal=True)
    fmt = params.get("format", "opus")
    if not isinstance(fmt, str):
        raise ProtocolError("protocol.bad_hello", "audio_params.format must be a string", fatal=True)
    rate = _int_param(params, "sample_rate", 16000)
    channels = _int_param(params, "channels", 1)
    if fmt != "opus" or rate != 16000 or channels != 1:
        raise ProtocolError("audio.unsupported_format", "xiaozhi uplink must be Opus, 16000 Hz, mono", fatal=True)


def _int_param(params: dict[str, Any], key: str, default: int) -> int:
    """An integer field (16000 or 16000.0; bool is no number here) or a fatal bad_hello."""
    value = params.get(key, default)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ProtocolError("protocol.bad_hello", f"audio_params.{key} must be an integer, got {short_repr(value)}",
                        fatal=True)


class XiaozhiProtocol(ProtocolAdapter):
    name = "xiaozhi"

    def __init__(self, protocol_version: int, output_sample_rate: int, max_frame_bytes: int,
                 wake_words: tuple[str, ...] = ()) -> None:
        if protocol_version not in (1, 2, 3):
            raise ProtocolError("xiaozhi.bad_version", f"Protocol-Version {protocol_version} is not 1, 2 or 3",
                                fatal=True)
        self.version = protocol_version
        self._out_rate = output_sample_rate
        self._max_frame = max_frame_bytes
        self._session_id = ""
        self._hello: dict[str, Any] | None = None
        self._decoder = OpusDecoder(16000)
        self._encoder = OpusEncoder(output_sample_rate, frame_ms=60)
        self._mcp = False
        self._sent_ms = 0
        self._wake_words = frozenset(_normalise_phrase(w) for w in wake_words)

    # ----------------------------------------------------------- inbound
    def on_text(self, data: str) -> list[Action]:
        kind, msg = parse_json_message(data, expect_hello=self._hello is None)
        if self._hello is None:
            return [self._on_hello(msg)]
        if kind == "listen":
            return self._on_listen(msg)
        if kind == "abort":
            return [Interrupt(_abort_reason(msg.get("reason")))]
        if kind == "mcp":
            if not isinstance(msg.get("payload"), dict):
                raise ProtocolError("protocol.bad_message", "'mcp' needs a JSON-RPC object in 'payload'")
            return [DeviceMessage("mcp", msg["payload"])]
        if kind == "iot":
            return [DeviceMessage("iot", {k: v for k, v in msg.items() if k in ("descriptors", "states", "update")})]
        if kind == "hello":
            raise ProtocolError("protocol.bad_message", "'hello' was already received")
        raise ProtocolError("protocol.unknown_type", f"unknown message type {short_repr(kind)}")

    def _on_hello(self, msg: dict[str, Any]) -> Hello:
        _check_audio_params(msg.get("audio_params"))
        if msg.get("transport", "websocket") != "websocket":
            raise ProtocolError("protocol.bad_hello", "only transport 'websocket' is served here", fatal=True)
        self._hello = msg
        features = msg.get("features") if isinstance(msg.get("features"), dict) else {}
        self._mcp = bool(features.get("mcp"))
        return Hello(session_id=None, output_sample_rate=self._out_rate, features=features)

    def _on_listen(self, msg: dict[str, Any]) -> list[Action]:
        state, mode = msg.get("state"), msg.get("mode", "auto")
        if not isinstance(mode, str) or mode not in LISTEN_MODES:
            raise ProtocolError("protocol.bad_message", f"unknown listen mode {short_repr(mode)}")
        if not isinstance(state, str):
            raise ProtocolError("protocol.bad_message", f"listen state must be a string, got {short_repr(state)}")
        if state in ("start", "stop"):
            return [Listen(state, mode)]
        if state == "detect":
            return self._on_detect(msg.get("text"))
        raise ProtocolError("protocol.bad_message", f"unknown listen state {short_repr(state)}")

    def _on_detect(self, text: object) -> list[Action]:
        """`listen detect` carries what the device heard or the person typed:
        a wake word (or nothing) is answered with the persona's greeting,
        anything else is a typed message, answered as a turn (py-xiaozhi and
        the reference server's browser page send typed chat this way)."""
        phrase = text.strip() if isinstance(text, str) else ""
        if len(phrase) > MAX_TEXT_CHARS:
            raise ProtocolError("protocol.bad_message", "'listen detect' text is too long")
        if not phrase or _normalise_phrase(phrase) in self._wake_words:
            return [Interrupt("wake_word_detected"), DeviceMessage("wake_word", phrase[:MAX_WAKE_WORD_CHARS]),
                    Greet()]
        return [Text(phrase)]

    def on_binary(self, data: bytes) -> list[Action]:
        if self._hello is None:
            raise ProtocolError("protocol.hello_required", "send 'hello' before audio", fatal=True)
        if len(data) > self._max_frame:
            raise ProtocolError("audio.frame_too_large", f"frame of {len(data)} bytes; the limit is {self._max_frame}")
        if not data:  # some clients mark the end of a recording with an empty message
            return []
        try:
            kind, payload = unpack_frame(self.version, data)
        except ValueError as e:
            raise ProtocolError("xiaozhi.bad_frame", str(e)) from None
        if kind != TYPE_OPUS:
            raise ProtocolError("xiaozhi.bad_frame", f"binary message type {kind} is not Opus audio")
        if not payload:  # ... or with a frame that carries no audio
            return []
        try:
            return [Audio(self._decoder.decode(payload))]
        except OpusDecodeError as e:
            raise ProtocolError("audio.bad_opus", f"could not decode an Opus packet: {e}") from None

    # ----------------------------------------------------------- outbound
    @property
    def wants_output_rate(self) -> int | None:
        return self._out_rate

    def hello_reply(self, session_id: str, resumed: bool, output_sample_rate: int) -> list[Outgoing]:
        self._session_id = session_id
        return [self._json({"type": "hello", "transport": "websocket", "audio_params": {
            "format": "opus", "sample_rate": self._out_rate, "channels": 1, "frame_duration": 60}})]

    def after_hello(self) -> list[Outgoing]:
        if not self._mcp:
            return []
        init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2024-11-05", "capabilities": {},
            "clientInfo": {"name": "voice-actors", "version": "0.1.0"}}}
        # ids 1 and 2 are fixed: the session's DeviceTools knows them (its own start at 1000)
        tools = {"jsonrpc": "2.0", "id": 2, "method": "tools/list", "params": {"cursor": ""}}
        return [self._json({"type": "mcp", "payload": init}), self._json({"type": "mcp", "payload": tools})]

    def mcp_request(self, payload: dict[str, Any]) -> list[Outgoing]:
        return [self._json({"type": "mcp", "payload": payload})]

    def error(self, code: str, message: str) -> list[Outgoing]:
        return [self._json({"type": "error", "code": code, "message": message})]

    def goodbye(self, session_id: str | None, reason: str, retry_after_ms: int) -> list[Outgoing]:
        """The firmware's own "channel closed" message, `{"session_id", "type":
        "goodbye"}` (its MQTT transport closes the audio channel on it; over
        WebSocket it ignores the message and acts on the close that follows,
        1012). The device opens a new channel at its next wake-up and gets
        its session back by its credentials."""
        return [self._json({"type": "goodbye"})]

    def encode(self, event: Any) -> list[Outgoing]:
        kind = event.type
        if kind == "stt.final":
            return [self._json({"type": "stt", "text": event.text})]
        if kind == "llm.emotion":
            return [self._json({"type": "llm", "emotion": event.emotion,
                                "text": EMOTION_EMOJI.get(event.emotion, "🙂")})]
        if kind == "tts.start":
            self._encoder.reset()  # a new reply starts from a clean codec state
            return [self._json({"type": "tts", "state": "start"})]
        if kind == "tts.sentence":
            return [self._json({"type": "tts", "state": "sentence_start", "text": event.text})]
        if kind == "tts.audio":
            return [self._frame(p) for p in self._encoder.encode(event.pcm16)]
        if kind == "tts.audio_end":  # the tail now, so it plays before `tts stop` arrives
            return [self._frame(p) for p in self._encoder.flush()]
        if kind == "tts.stop":
            if event.reason != "done":
                self._encoder.reset()  # the cut reply's buffered tail is never sent
            return [self._json({"type": "tts", "state": "stop"})]
        if kind == "device.request":  # the session's MCP client speaking to the device's tools
            return self.mcp_request(event.payload) if self._mcp else []
        if kind == "error":
            if event.code == "session.closed":
                return []  # the device learns it from the socket's normal close that follows
            return self.error(str(event.code), event.message)
        return []

    def _frame(self, packet: bytes) -> bytes:
        self._sent_ms += 60
        return pack_frame(self.version, packet, self._sent_ms)

    def _json(self, msg: dict[str, Any]) -> str:
        return safe_json.dumps({"session_id": self._session_id, **msg})
