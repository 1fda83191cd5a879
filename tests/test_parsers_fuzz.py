"""Every parser a client can reach, fuzzed with Hypothesis (no Ray).

The contract under test: client input either parses or is refused with the
module's own error (JSONLimitError, ProtocolError with a known code,
AudioFormatError) — never RecursionError, ValueError, UnicodeEncodeError,
ZeroDivisionError or a gigabyte allocation. The explicit regression tests at
the end are the cases a security audit found."""

from __future__ import annotations

import functools
import io
import json
import math
import struct
import time
import tracemalloc
import wave
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors import safe_json
from actors.audio import AudioFormatError, float_to_pcm16, read_wav, wav_bytes
from actors.audio_formats import decode_upload
from actors.protocols.base import (
    SESSION_ID_PATTERN,
    Action,
    Audio,
    DeviceMessage,
    Greet,
    Hello,
    HistoryRequest,
    Interrupt,
    Listen,
    ProtocolError,
    Reply,
    Text,
    echo_id,
    parse_json_message,
    valid_session_id,
)
from actors.protocols.native import NativeProtocol
from actors.protocols.text_stream import TextStreamProtocol
from actors.protocols.xiaozhi import XiaozhiProtocol, _check_audio_params, pack_frame, unpack_frame
from tests.test_opus_and_formats import write_container

FUZZ = settings(deadline=None, database=None, max_examples=150,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SLOW_FUZZ = settings(FUZZ, max_examples=60)

KNOWN_CODES = {
    "protocol.bad_json", "protocol.too_deep", "limit.too_large", "protocol.bad_message", "protocol.unknown_type",
    "protocol.hello_required", "protocol.bad_hello", "protocol.version", "protocol.bad_session_id",
    "protocol.no_audio", "audio.unsupported_format", "audio.frame_too_large", "audio.empty", "audio.odd_length",
    "audio.bad_opus", "xiaozhi.bad_frame",
}
JSON_CODES = {"json.too_large", "json.too_deep", "json.bad_number", "json.bad_constant", "json.bad_string",
              "json.invalid"}
ACTIONS = (Hello, Audio, Text, Interrupt, Listen, Greet, DeviceMessage, Reply, HistoryRequest)
MAX_FRAME = 32_000

# ------------------------------------------------------------------ strategies
# Everything json.dumps can write, including what safe_json must refuse:
# NaN/Infinity, integers past the digit limit, lone surrogates.
scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=10 ** 99, max_value=10 ** 200)
           | st.floats() | st.text(max_size=30) | st.sampled_from(["\ud800", "a\udfffb", "start", "hello"]))
json_values = st.recursive(scalars, lambda kids: st.lists(kids, max_size=5)
                           | st.dictionaries(st.text(max_size=8), kids, max_size=5), max_leaves=25)


@st.composite
def nested(draw: st.DrawFn) -> str:
    """Arrays and objects nested 1..3000 deep, closed or not."""
    depth = draw(st.integers(1, 3000))
    opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}"), ('[{"k":', "}]")]))
    tail = closer * depth if draw(st.booleans()) else ""
    return opener * depth + draw(st.sampled_from(["1", "null", '"x"', "[]"])) + tail


def _dump(value: Any) -> str:
    return json.dumps(value)  # allow_nan and ASCII escapes: writes "NaN" and "\ud800"


json_texts = st.one_of(
    st.text(max_size=200),
    json_values.map(_dump),
    nested(),
    st.integers(1, 6000).map(lambda n: "1" * n),
    st.sampled_from(["NaN", "-Infinity", "[Infinity]", "1e999", "-1e999", '"\\ud800"', '{"\\udc00": 1}',
                     '"\\ud83d\\ude00"', "", " ", "[", "{}", '{"a":}', "\ufeff{}"]),
)
json_bytes = st.one_of(st.binary(max_size=200), json_texts.map(lambda t: t.encode("utf-8", "surrogatepass")))

MESSAGE_TYPES = ["hello", "text", "interrupt", "listen", "ping", "history", "abort", "mcp", "iot", "dance", ""]
FIELDS = ["type", "id", "text", "state", "mode", "reason", "payload", "session_id", "version", "audio", "output",
          "audio_params", "transport", "features", "descriptors", "states"]


@st.composite
def messages(draw: st.DrawFn) -> str | bytes:
    """A JSON-ish text frame or a binary one: mostly objects with a plausible
    type and random values of every JSON type in the fields adapters read."""
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.binary(max_size=400))
    if kind == 1:
        return draw(json_texts)
    msg: dict[str, Any] = {"type": draw(st.sampled_from(MESSAGE_TYPES) | json_values)}
    for name in draw(st.lists(st.sampled_from(FIELDS[1:]), max_size=5, unique=True)):
        msg[name] = draw(json_values | st.sampled_from(["start", "stop", "detect", "auto", "manual", "realtime"]))
    return _dump(msg)


# ------------------------------------------------------------------ helpers
def feed(proto: Any, frames: list[str | bytes]) -> list[Action]:
    """Drive an adapter the way the connection does: errors are reported,
    fatal ones end the socket. Only ProtocolError with a known code may escape
    an adapter, and every reply must be valid, encodable JSON."""
    out: list[Action] = []
    for frame in frames:
        try:
            actions = proto.on_binary(frame) if isinstance(frame, bytes) else proto.on_text(frame)
        except ProtocolError as e:
            assert e.code in KNOWN_CODES, e.code
            assert_wire_json(proto.error(e.code, e.message)[0])
            if e.fatal:
                break
            continue
        assert isinstance(actions, list) and all(isinstance(a, ACTIONS) for a in actions), actions
        for action in actions:
            if isinstance(action, Reply) and isinstance(action.data, str):
                assert_wire_json(action.data)
        out.extend(actions)
    return out


def assert_wire_json(text: str) -> Any:
    """What the server sends: strict JSON (no NaN), valid UTF-8."""
    text.encode("utf-8")
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} sent on the wire"))


def wav_header(channels: int, rate: int, bits: int, data_size: int, tag: int = 1) -> bytes:
    """A canonical 44-byte RIFF/WAVE header with whatever numbers it is given."""
    block = (channels * ((bits + 7) // 8)) & 0xFFFF
    fmt = struct.pack("<HHIIHH", tag, channels, rate, (rate * block) & 0xFFFFFFFF, block, bits)
    riff_size = min(4 + 8 + len(fmt) + 8 + data_size, 0xFFFFFFFF)
    return b"RIFF" + struct.pack("<I", riff_size) + b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt \
        + b"data" + struct.pack("<I", data_size & 0xFFFFFFFF)


def native_hello(opus: bool = False) -> str:
    return json.dumps({"type": "hello", "version": 1, "audio": {"format": "opus" if opus else "pcm16"}})


XIAOZHI_HELLO = json.dumps({"type": "hello", "version": 1, "transport": "websocket", "features": {"mcp": True},
                            "audio_params": {"format": "opus", "sample_rate": 16000, "channels": 1,
                                             "frame_duration": 60}})


# ------------------------------------------------------------------ safe_json
@FUZZ
@given(json_texts | json_bytes)
def test_safe_json_returns_or_refuses_and_round_trips(data: str | bytes) -> None:
    try:
        value = safe_json.loads(data)
    except safe_json.JSONLimitError as e:
        assert e.code in JSON_CODES
        return
    again = safe_json.dumps(value)
    assert_wire_json(again)
    assert safe_json.loads(again) == value


@FUZZ
@given(json_values)
def test_safe_json_dumps_always_writes_valid_json(value: Any) -> None:
    text = safe_json.dumps(value)
    decoded = assert_wire_json(text)
    if isinstance(value, float) and not math.isfinite(value):
        assert decoded is None


@FUZZ
@given(st.integers(1, 3000), st.sampled_from(["[", '{"a":']))
def test_safe_json_depth_limit(depth: int, opener: str) -> None:
    closer = "]" if opener == "[" else "}"
    text = opener * depth + "0" + closer * depth
    if depth <= safe_json.MAX_DEPTH:
        assert safe_json.loads(text) is not None
    else:
        with pytest.raises(safe_json.JSONLimitError) as err:
            safe_json.loads(text)
        assert err.value.code == "json.too_deep"


# ------------------------------------------------------------------ protocols
@FUZZ
@given(st.booleans(), st.lists(messages(), max_size=8))
def test_native_protocol_survives_anything_after_hello(opus: bool, frames: list[str | bytes]) -> None:
    proto = NativeProtocol(MAX_FRAME)
    assert isinstance(proto.on_text(native_hello(opus))[0], Hello)
    feed(proto, frames)


@FUZZ
@given(st.lists(messages(), min_size=1, max_size=4))
def test_native_protocol_survives_anything_before_hello(frames: list[str | bytes]) -> None:
    feed(NativeProtocol(MAX_FRAME), frames)


@FUZZ
@given(json_values, json_values, json_values, json_values)
def test_native_hello_fields_of_any_type(version: Any, session_id: Any, audio: Any, output: Any) -> None:
    msg = {"type": "hello", "version": version, "session_id": session_id, "audio": audio, "output": output}
    feed(NativeProtocol(MAX_FRAME), [_dump(msg), _dump({"type": "ping", "id": version})])


@SLOW_FUZZ
@given(st.sampled_from([1, 2, 3]), st.lists(messages(), max_size=8))
def test_xiaozhi_protocol_survives_anything_after_hello(version: int, frames: list[str | bytes]) -> None:
    proto = XiaozhiProtocol(version, 24000, MAX_FRAME)
    assert isinstance(proto.on_text(XIAOZHI_HELLO)[0], Hello)
    feed(proto, frames)


@SLOW_FUZZ
@given(st.sampled_from([1, 2, 3]), st.lists(messages(), min_size=1, max_size=4))
def test_xiaozhi_protocol_survives_anything_before_hello(version: int, frames: list[str | bytes]) -> None:
    feed(XiaozhiProtocol(version, 24000, MAX_FRAME), frames)


@FUZZ
@given(json_values, json_values, json_values, json_values)
def test_xiaozhi_hello_audio_params_of_any_type(fmt: Any, rate: Any, channels: Any, params: Any) -> None:
    proto = XiaozhiProtocol(3, 24000, MAX_FRAME)
    feed(proto, [_dump({"type": "hello", "audio_params": {"format": fmt, "sample_rate": rate, "channels": channels}})])
    feed(XiaozhiProtocol(3, 24000, MAX_FRAME), [_dump({"type": "hello", "audio_params": params})])


@SLOW_FUZZ
@given(st.sampled_from([1, 2, 3]), st.lists(st.binary(max_size=300), max_size=6))
def test_xiaozhi_binary_frames(version: int, frames: list[bytes]) -> None:
    proto = XiaozhiProtocol(version, 24000, MAX_FRAME)
    proto.on_text(XIAOZHI_HELLO)
    framed = [pack_frame(version, f) if i % 2 else f for i, f in enumerate(frames)]
    feed(proto, framed)


@FUZZ
@given(st.integers(-5, 10), st.binary(max_size=64))
def test_unpack_frame_only_raises_value_error(version: int, frame: bytes) -> None:
    try:
        kind, payload = unpack_frame(version, frame)
    except ValueError:
        return
    assert isinstance(kind, int) and isinstance(payload, bytes) and len(payload) <= len(frame)


@FUZZ
@given(st.lists(messages(), min_size=1, max_size=8))
def test_text_stream_survives_anything(frames: list[str | bytes]) -> None:
    actions = feed(TextStreamProtocol(), frames)
    hellos = [a for a in actions if isinstance(a, Hello)]
    assert len(hellos) <= 1
    assert all(h.session_id is None or valid_session_id(h.session_id) for h in hellos)


@FUZZ
@given(json_values | st.text(max_size=80))
def test_text_stream_session_id_of_any_value(session_id: Any) -> None:
    msg = _dump({"type": "text", "text": "hi", "session_id": session_id})
    try:
        actions = TextStreamProtocol().on_text(msg)
    except ProtocolError as e:
        assert e.fatal and e.code in {"protocol.bad_session_id", "protocol.bad_json"}
        return
    assert actions[0].session_id == session_id and (session_id is None or valid_session_id(session_id))


# ------------------------------------------------------------------ audio
WIDTHS = st.sampled_from([0, 8, 16, 16, 16, 24, 32, 12, 1])
RATES = st.one_of(st.sampled_from([0, 1, 2, 3999, 4000, 8000, 16000, 44100, 192000, 192001, 2 ** 32 - 1]),
                  st.integers(0, 2 ** 32 - 1))
CLAIMS = st.one_of(st.integers(0, 8192), st.sampled_from([0xFFFFFFFF, 0x7FFFFFFF, 2 ** 31 + 8]),
                   st.integers(0, 2 ** 32 - 1))


@SLOW_FUZZ
@given(st.integers(0, 8), RATES, WIDTHS, CLAIMS, st.binary(max_size=6000), st.sampled_from([0.05, 1.0, 300.0]))
def test_read_wav_with_any_header(channels: int, rate: int, bits: int, claim: int, payload: bytes,
                                  max_seconds: float) -> None:
    data = wav_header(channels, rate, bits, claim) + payload
    try:
        pcm = read_wav(data, 16000, max_seconds=max_seconds)
    except AudioFormatError:
        return
    assert channels in (1, 2) and (bits + 7) // 8 == 2 and 4000 <= rate <= 192000  # wave: 9-16 bits → 2 bytes
    assert len(pcm) % 2 == 0 and len(pcm) // 2 <= max_seconds * 16000


@FUZZ
@given(st.binary(max_size=600))
def test_read_wav_with_random_bytes(data: bytes) -> None:
    for blob in (data, b"RIFF" + data[:4] + b"WAVE" + data[4:]):
        try:
            pcm = read_wav(blob, max_seconds=1.0)
        except AudioFormatError:
            continue
        assert len(pcm) // 2 <= 16000


UPLOAD_TYPES = [None, "", "audio/wav", "audio/L16", "audio/L16;rate=8000", "audio/l16; rate=0", "audio/pcm;rate=-5",
                "audio/pcm;rate=99999999999999999999", "audio/pcm; channels=2", "audio/pcm;channels=0",
                "audio/ogg", "audio/webm", "audio/mpeg", "application/octet-stream", "text/plain", "image/png",
                "audio/pcm;rate=１６０００", "audio/pcm;rate=16_000"]


@SLOW_FUZZ
@given(st.binary(min_size=0, max_size=2000), st.sampled_from(UPLOAD_TYPES),
       st.sampled_from([None, "a.wav", "a.ogg", "a.webm", "a.mp3", "a.pcm", "noext"]),
       st.one_of(st.none(), st.sampled_from([0, -1, 1, 3999, 8000, 16000, 10 ** 9]), st.integers()))
def test_decode_upload_with_random_bytes(data: bytes, content_type: str | None, filename: str | None,
                                         declared_rate: int | None) -> None:
    for blob in (data, wav_header(1, 8000, 16, len(data)) + data):
        try:
            pcm = decode_upload(blob, content_type, filename, declared_rate, max_seconds=2.0)
        except AudioFormatError:
            continue
        assert pcm and len(pcm) % 2 == 0 and len(pcm) // 2 <= 2.0 * 16000


@functools.cache
def container(fmt: str, codec: str, rate: int) -> bytes:
    """0.3 s of tone in a real Ogg/WebM/MP3 file, to be corrupted below."""
    t = np.arange(int(0.3 * rate)) / rate
    return write_container(fmt, codec, (0.25 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), rate)


@SLOW_FUZZ
@given(st.sampled_from([("ogg", "libopus", 48000), ("webm", "libopus", 48000), ("mp3", "libmp3lame", 44100)]),
       st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), max_size=12),
       st.floats(0.05, 1.0))
def test_decode_upload_with_corrupted_containers(spec: tuple[str, str, int], flips: list[tuple[float, int]],
                                                 keep: float) -> None:
    data = bytearray(container(*spec))
    for where, value in flips:
        data[int(where * len(data))] = value
    data = data[:max(1, int(keep * len(data)))]
    try:
        pcm = decode_upload(bytes(data), None, "upload." + spec[0], max_seconds=0.2)
    except AudioFormatError:
        return
    assert len(pcm) % 2 == 0 and len(pcm) // 2 <= 0.2 * 16000


# ------------------------------------------------------------------ audit regressions
@pytest.mark.parametrize("opener, closer", [("[", "]"), ('{"a":', "}")])
def test_990_deep_nesting_is_too_deep_not_recursion_error(opener: str, closer: str) -> None:
    text = opener * 990 + "1" + closer * 990
    with pytest.raises(safe_json.JSONLimitError) as err:
        safe_json.loads(text)
    assert err.value.code == "json.too_deep"
    with pytest.raises(safe_json.JSONLimitError) as err:
        safe_json.loads(opener * 100_000, max_bytes=10 ** 6)
    assert err.value.code in {"json.too_deep", "json.invalid"}
    proto = NativeProtocol(MAX_FRAME)
    proto.on_text(native_hello())
    with pytest.raises(ProtocolError) as perr:
        proto.on_text('{"type": "ping", "id": ' + text + "}")
    assert perr.value.code == "protocol.too_deep" and not perr.value.fatal


def test_5000_digit_integers_are_bad_numbers() -> None:
    with pytest.raises(safe_json.JSONLimitError) as err:
        safe_json.loads("9" * 5000)
    assert err.value.code == "json.bad_number"
    assert safe_json.loads("-" + "9" * 100) == -int("9" * 100)
    with pytest.raises(safe_json.JSONLimitError):
        safe_json.loads("9" * 101)
    proto = NativeProtocol(MAX_FRAME)
    proto.on_text(native_hello())
    with pytest.raises(ProtocolError) as perr:
        proto.on_text('{"type": "ping", "id": ' + "1" * 5000 + "}")
    assert perr.value.code == "protocol.bad_json" and not perr.value.fatal


@pytest.mark.parametrize("text, code", [
    ("NaN", "json.bad_constant"), ('{"id": Infinity}', "json.bad_constant"), ("[-Infinity]", "json.bad_constant"),
    ("1e999", "json.bad_number"), ('"\\ud800"', "json.bad_string"), ('{"\\udfff": 1}', "json.bad_string"),
    ('["ok", {"x": "a\\udc00"}]', "json.bad_string"), ("{not json", "json.invalid"), (b"\xff\xfe{}", "json.invalid"),
    ("x" * 70_000, "json.too_large"), ("[" + "1," * 40_000 + "1]", "json.too_large"),
])
def test_safe_json_codes(text: str | bytes, code: str) -> None:
    with pytest.raises(safe_json.JSONLimitError) as err:
        safe_json.loads(text)
    assert err.value.code == code and isinstance(err.value, ValueError)


def test_safe_json_keeps_valid_unicode_and_dumps_never_emits_nan() -> None:
    assert safe_json.loads('"\\ud83d\\ude00 é"') == "\U0001F600 é"
    assert safe_json.loads("\"\U0001F600\"".encode()) == "\U0001F600"
    text = safe_json.dumps({"type": "pong", "id": float("nan"), "t": "a\ud800", "x": [float("-inf")]})
    assert assert_wire_json(text) == {"type": "pong", "id": None, "t": "a\ufffd", "x": [None]}
    assert safe_json.dumps({"t": "é"}) == '{"t": "é"}'  # ensure_ascii=False, as the adapters sent before


def test_lone_surrogate_text_is_refused_and_the_socket_survives() -> None:
    proto = NativeProtocol(MAX_FRAME)
    proto.on_text(native_hello())
    with pytest.raises(ProtocolError) as err:
        proto.on_text('{"type": "text", "text": "hi \\ud800"}')
    assert err.value.code == "protocol.bad_json" and not err.value.fatal
    assert proto.on_text('{"type": "text", "text": "hi"}') == [Text("hi")]
    with pytest.raises(ProtocolError) as err:
        TextStreamProtocol().on_text('{"type": "text", "text": "\\udfff"}')
    assert err.value.code == "protocol.bad_json" and err.value.fatal  # first message: nothing to keep open


def test_bad_json_before_hello_is_fatal_after_hello_is_not() -> None:
    with pytest.raises(ProtocolError) as err:
        parse_json_message("{not json", expect_hello=True)
    assert err.value.code == "protocol.bad_json" and err.value.fatal
    with pytest.raises(ProtocolError) as err:
        parse_json_message("[1, 2]")
    assert err.value.code == "protocol.bad_message" and not err.value.fatal
    with pytest.raises(ProtocolError) as err:
        parse_json_message('{"type": "text"}', expect_hello=True)
    assert err.value.code == "protocol.hello_required" and err.value.fatal


@pytest.mark.parametrize("ping_id, echoed", [
    (7, 7), ("abc", "abc"), (1.5, 1.5), (-(2 ** 53), -(2 ** 53)), (2 ** 53 + 1, None), (10 ** 99, None),
    ("x" * 65, None), ("x" * 64, "x" * 64), (True, None), (None, None), ([1], None), ({"a": 1}, None),
])
def test_ping_echoes_only_safe_ids(ping_id: Any, echoed: Any) -> None:
    for proto in (NativeProtocol(MAX_FRAME), TextStreamProtocol()):
        if isinstance(proto, NativeProtocol):
            proto.on_text(native_hello())
        reply = proto.on_text(json.dumps({"type": "ping", "id": ping_id}))[-1]
        assert isinstance(reply, Reply) and assert_wire_json(reply.data) == {"type": "pong", "id": echoed}


def test_nan_ping_id_is_refused_not_echoed() -> None:
    assert echo_id(float("nan")) is None and echo_id(float("inf")) is None
    proto = NativeProtocol(MAX_FRAME)
    proto.on_text(native_hello())
    with pytest.raises(ProtocolError) as err:
        proto.on_text('{"type": "ping", "id": NaN}')
    assert err.value.code == "protocol.bad_json" and not err.value.fatal


def test_text_over_4000_characters_is_a_bad_message() -> None:
    proto = NativeProtocol(MAX_FRAME)
    proto.on_text(native_hello())
    assert proto.on_text(json.dumps({"type": "text", "text": "é" * 4000})) == [Text("é" * 4000)]
    for bad in ("a" * 4001, 42, None, ["a"]):
        with pytest.raises(ProtocolError) as err:
            proto.on_text(json.dumps({"type": "text", "text": bad}))
        assert err.value.code == "protocol.bad_message" and not err.value.fatal
    with pytest.raises(ProtocolError) as err:
        TextStreamProtocol().on_text(json.dumps({"text": "a" * 4001}))
    assert err.value.code == "protocol.bad_message"


@pytest.mark.parametrize("value", ["abc", "", None, [], {}, True, False, 16000.5, "16000"])
@pytest.mark.parametrize("field", ["sample_rate", "channels"])
def test_xiaozhi_hello_with_bad_audio_params_is_fatal(field: str, value: Any) -> None:
    proto = XiaozhiProtocol(3, 24000, MAX_FRAME)
    with pytest.raises(ProtocolError) as err:
        proto.on_text(json.dumps({"type": "hello", "audio_params": {field: value}}))
    assert err.value.code in {"protocol.bad_hello", "audio.unsupported_format"} and err.value.fatal


def test_xiaozhi_hello_sample_rate_1e999_is_fatal() -> None:
    """1e999 never reaches the hello check (safe_json refuses it as JSON), but
    as a float it would be a bad hello too."""
    with pytest.raises(ProtocolError) as err:
        XiaozhiProtocol(3, 24000, MAX_FRAME).on_text('{"type": "hello", "audio_params": {"sample_rate": 1e999}}')
    assert err.value.code == "protocol.bad_json" and err.value.fatal
    for value in (float("inf"), float("nan")):
        with pytest.raises(ProtocolError) as err:
            _check_audio_params({"sample_rate": value})
        assert err.value.code == "protocol.bad_hello" and err.value.fatal


def test_xiaozhi_hello_formats() -> None:
    assert isinstance(XiaozhiProtocol(1, 24000, MAX_FRAME).on_text(XIAOZHI_HELLO)[0], Hello)
    ok = {"type": "hello", "audio_params": {"format": "opus", "sample_rate": 16000.0, "channels": 1}}
    assert isinstance(XiaozhiProtocol(1, 24000, MAX_FRAME).on_text(json.dumps(ok))[0], Hello)
    assert isinstance(XiaozhiProtocol(1, 24000, MAX_FRAME).on_text('{"type": "hello"}')[0], Hello)
    for params, code in [({"format": 1}, "protocol.bad_hello"), ({"format": "pcm"}, "audio.unsupported_format"),
                         ({"sample_rate": 8000}, "audio.unsupported_format"), ([], "protocol.bad_hello"),
                         ({"channels": 2}, "audio.unsupported_format"), ("opus", "protocol.bad_hello")]:
        with pytest.raises(ProtocolError) as err:
            XiaozhiProtocol(1, 24000, MAX_FRAME).on_text(json.dumps({"type": "hello", "audio_params": params}))
        assert err.value.code == code and err.value.fatal, params


def test_xiaozhi_listen_and_abort_field_types() -> None:
    proto = XiaozhiProtocol(3, 24000, MAX_FRAME)
    proto.on_text(XIAOZHI_HELLO)
    for msg in ({"state": 5}, {"state": ["start"]}, {"state": "start", "mode": []}, {"state": "start", "mode": 1},
                {"state": None}, {"state": "start", "mode": {"a": 1}}):
        with pytest.raises(ProtocolError) as err:
            proto.on_text(json.dumps({"type": "listen", **msg}))
        assert err.value.code == "protocol.bad_message" and not err.value.fatal
    assert proto.on_text('{"type": "listen", "state": "start", "mode": "manual"}') == [Listen("start", "manual")]
    detect = proto.on_text(json.dumps({"type": "listen", "state": "detect", "text": {"x": 1}}))
    assert detect == [Interrupt("wake_word_detected"), DeviceMessage("wake_word", ""), Greet()]
    typed = proto.on_text(json.dumps({"type": "listen", "state": "detect", "text": "  What time is it? "}))
    assert typed == [Text("What time is it?")]  # typed chat is a turn (issue 8, item 3)
    with pytest.raises(ProtocolError) as err:
        proto.on_text(json.dumps({"type": "listen", "state": "detect", "text": "x" * 4001}))
    assert err.value.code == "protocol.bad_message"
    assert proto.on_binary(b"") == [] and proto.on_binary(pack_frame(3, b"")) == []  # end-of-recording markers
    assert proto.on_text('{"type": "abort", "reason": "wake_word_detected"}') == [Interrupt("wake_word_detected")]
    for reason in ("r" * 65, 5, [], {"a": "b"}, None, ""):
        assert proto.on_text(json.dumps({"type": "abort", "reason": reason})) == [Interrupt("abort")]
    assert proto.on_text('{"type": "mcp", "payload": {"jsonrpc": "2.0", "id": 1}}') == [
        DeviceMessage("mcp", {"jsonrpc": "2.0", "id": 1})]


@pytest.mark.parametrize("session_id", ["../../etc/passwd", "a" * 20_000, "a\x00b", "   ", "", "a.b", "a:b",
                                        "a\n", "é", 42, True, [], {"a": 1}])
def test_text_stream_refuses_bad_session_ids(session_id: Any) -> None:
    with pytest.raises(ProtocolError) as err:
        TextStreamProtocol().on_text(json.dumps({"type": "text", "text": "hi", "session_id": session_id}))
    assert err.value.code == "protocol.bad_session_id" and err.value.fatal


def test_session_id_rule_is_shared() -> None:
    assert SESSION_ID_PATTERN == r"^[A-Za-z0-9_-]{1,64}$"
    for good in ("0123456789abcdef", "A_b-C", "x" * 64):
        assert valid_session_id(good)
        actions = TextStreamProtocol().on_text(json.dumps({"text": "hi", "session_id": good}))
        assert actions == [Hello(session_id=good), Text("hi")]
        hello = NativeProtocol(MAX_FRAME).on_text(json.dumps({"type": "hello", "session_id": good}))
        assert hello[0].session_id == good
    assert TextStreamProtocol().on_text('{"text": "hi", "session_id": null}')[0] == Hello(session_id=None)
    for bad in ("x" * 65, "a.b", "a:b", "a\n", "../x"):
        assert not valid_session_id(bad)
        with pytest.raises(ProtocolError) as err:
            NativeProtocol(MAX_FRAME).on_text(json.dumps({"type": "hello", "session_id": bad}))
        assert err.value.code == "protocol.bad_hello" and err.value.fatal


def test_wav_claiming_1_hz_is_refused_without_allocating() -> None:
    data = wav_header(1, 1, 16, 8192) + bytes(8192)
    tracemalloc.start()
    try:
        with pytest.raises(AudioFormatError, match="sample rate"):
            read_wav(data)
        with pytest.raises(AudioFormatError, match="sample rate"):
            decode_upload(data, "audio/wav")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 50 * 2 ** 20


@pytest.mark.parametrize("channels, rate, bits, claim, message", [
    (1, 0, 16, 100, "sample rate"), (1, 3999, 16, 100, "sample rate"), (1, 192001, 16, 100, "sample rate"),
    (3, 16000, 16, 96, "mono or stereo"), (1, 16000, 8, 100, "16-bit"), (1, 16000, 16, 16000 * 2 * 400, "limit"),
    (1, 16000, 16, 100_000, "truncated"),
])
def test_wav_header_checks(channels: int, rate: int, bits: int, claim: int, message: str) -> None:
    data = wav_header(channels, rate, bits, claim) + bytes(min(claim, 4000))
    with pytest.raises(AudioFormatError, match=message):
        read_wav(data)


def test_wav_output_length_is_checked_before_resampling() -> None:
    pcm = float_to_pcm16(np.zeros(8000, dtype=np.float32))  # 2 s at 4 kHz = 2 s at 16 kHz
    with pytest.raises(AudioFormatError, match="limit"):
        read_wav(wav_bytes(pcm, 4000), max_seconds=1.5)
    assert len(read_wav(wav_bytes(pcm, 4000), max_seconds=2.0)) == 2 * 32000


def test_streamed_wav_of_unknown_length_still_decodes() -> None:
    """arecord and ffmpeg-to-a-pipe write 0xFFFFFFFF as the data size."""
    pcm = float_to_pcm16(np.zeros(1600, dtype=np.float32))
    assert len(read_wav(wav_header(1, 16000, 16, 0xFFFFFFFF) + pcm)) == len(pcm)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(bytes(3200))
    assert len(read_wav(buf.getvalue())) == 2 * 1600


@pytest.mark.parametrize("declared_rate", [0, -1, -16000, 1, 3999, 192001, 10 ** 9, 10 ** 30])
def test_absurd_declared_rates_are_format_errors(declared_rate: int) -> None:
    with pytest.raises(AudioFormatError, match="rate"):
        decode_upload(bytes(3200), "application/octet-stream", declared_rate=declared_rate)


@pytest.mark.parametrize("content_type", ["audio/L16;rate=0", "audio/L16;rate=-8000", "audio/L16;rate=1",
                                          "audio/L16;rate=" + "9" * 5000, "audio/L16;rate=１６０００",
                                          "audio/L16;rate=abc", "audio/L16;rate="])
def test_absurd_content_type_rates_are_format_errors(content_type: str) -> None:
    with pytest.raises(AudioFormatError, match="rate"):
        decode_upload(bytes(3200), content_type)


def test_raw_pcm_duration_is_checked_before_resampling() -> None:
    pcm = bytes(2 * 4000 * 3)  # 3 s at 4 kHz: 12,000 samples in, 48,000 out
    started = time.monotonic()
    with pytest.raises(AudioFormatError, match="limit"):
        decode_upload(pcm, "audio/L16;rate=4000", max_seconds=2.0)
    assert time.monotonic() - started < 5
    assert len(decode_upload(pcm, "audio/L16;rate=4000", max_seconds=3.0)) == 2 * 48000


# ------------------------------------------------------------------ issue 12, item 7: binary framing and Opus
@FUZZ
@given(st.sampled_from([2, 3]), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 0xFFFFFFFF),
       st.integers(0, 0xFFFFFFFF), st.binary(max_size=200), st.integers(-3, 3), st.integers(0, 40))
def test_xiaozhi_v2_v3_headers_with_any_fields(version: int, v2_version: int, kind: int, reserved: int,
                                               timestamp: int, payload: bytes, size_delta: int, cut: int) -> None:
    """Every header field any value, the size field off by a little, the frame
    cut short: unpack_frame gives back exactly the payload when the size is
    right, else ValueError; the adapter maps both to its own codes."""
    from actors.protocols.xiaozhi import V2_HEADER, V3_HEADER

    size = max(0, len(payload) + size_delta)
    if version == 2:
        frame = V2_HEADER.pack(v2_version, kind, reserved, timestamp, size) + payload
    else:
        frame = V3_HEADER.pack(kind & 0xFF, reserved & 0xFF, size & 0xFFFF) + payload
    frame = frame[:len(frame) - cut] if cut else frame
    header = V2_HEADER.size if version == 2 else V3_HEADER.size
    try:
        got_kind, got = unpack_frame(version, frame)
    except ValueError:
        assert len(frame) < header or size != len(frame) - header
    else:
        assert got == frame[header:] and len(got) == size and got_kind == (kind if version == 2 else kind & 0xFF)
    proto = XiaozhiProtocol(version, 24000, MAX_FRAME)
    proto.on_text(XIAOZHI_HELLO)
    feed(proto, [frame])


@FUZZ
@given(st.sampled_from([1, 2, 3]), st.binary(max_size=300), st.integers(0, 2 ** 32 - 1))
def test_xiaozhi_pack_unpack_round_trip(version: int, payload: bytes, timestamp: int) -> None:
    if version == 3 and len(payload) > 0xFFFF:
        return
    assert unpack_frame(version, pack_frame(version, payload, timestamp)) == (0, payload)


@functools.cache
def real_opus_packets() -> tuple[bytes, ...]:
    from actors.protocols.opus import OpusEncoder

    t = np.arange(16000) / 16000
    tone = float_to_pcm16((0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32))
    return tuple(OpusEncoder(16000, frame_ms=60).encode(tone))


@FUZZ
@given(st.one_of(st.binary(min_size=1, max_size=1500),
                 st.tuples(st.integers(0, 15), st.lists(st.tuples(st.floats(0, 1, exclude_max=True),
                                                                  st.integers(0, 255)), max_size=8),
                           st.floats(0.05, 1.0))))
def test_opus_decoder_on_random_and_corrupted_packets(spec: bytes | tuple[int, list[tuple[float, int]], float]) -> None:
    """Random packets and real ones with bytes flipped or cut: PCM16 of at
    most one Opus packet's worth (120 ms), or OpusDecodeError; and the same
    decoder still decodes a good packet afterwards."""
    from actors.protocols.opus import OpusDecodeError, OpusDecoder

    if isinstance(spec, bytes):
        packet = spec
    else:
        index, flips, keep = spec
        data = bytearray(real_opus_packets()[index % len(real_opus_packets())])
        for where, value in flips:
            data[int(where * len(data))] = value
        packet = bytes(data[:max(1, int(keep * len(data)))])
    decoder = OpusDecoder(16000)
    try:
        pcm = decoder.decode(packet)
    except OpusDecodeError:
        pass
    else:
        assert len(pcm) % 2 == 0 and len(pcm) <= 2 * 16000 * 0.12 + 2 * 480, len(pcm)
    assert len(decoder.decode(real_opus_packets()[1])) > 0


@FUZZ
@given(st.booleans(), st.lists(st.one_of(st.binary(max_size=2000), st.integers(0, 40_000).map(bytes)), max_size=6))
def test_native_binary_frames_of_any_length(opus: bool, frames: list[bytes]) -> None:
    """PCM16: even-length frames up to the limit pass through unchanged; empty,
    odd or over-long ones are refused, non-fatally. Opus: decoded or bad_opus."""
    proto = NativeProtocol(MAX_FRAME)
    proto.on_text(native_hello(opus))
    for frame in frames:
        try:
            actions = proto.on_binary(frame)
        except ProtocolError as e:
            assert not e.fatal and e.code in {"audio.empty", "audio.odd_length", "audio.frame_too_large",
                                              "audio.bad_opus"}, e.code
            assert opus or len(frame) > MAX_FRAME or not frame or len(frame) % 2
            continue
        assert len(frame) <= MAX_FRAME and len(actions) == 1 and isinstance(actions[0], Audio)
        if not opus:
            assert actions[0].pcm16 == frame


def test_binary_before_hello_is_fatal_on_every_socket() -> None:
    for proto in (NativeProtocol(MAX_FRAME), XiaozhiProtocol(2, 24000, MAX_FRAME)):
        with pytest.raises(ProtocolError) as err:
            proto.on_binary(b"\x00\x01")
        assert err.value.code == "protocol.hello_required" and err.value.fatal
    with pytest.raises(ProtocolError) as err:
        TextStreamProtocol().on_binary(b"\x00")
    assert err.value.code == "protocol.no_audio"
