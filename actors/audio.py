"""PCM helpers shared by providers, protocols, tests and tools: one place to
convert, resample and read/write WAV so every part agrees on the format."""

from __future__ import annotations

import io
import struct
import wave
from pathlib import Path

import numpy as np

from actors.providers.base import SAMPLE_RATE


def float_to_pcm16(samples: np.ndarray) -> bytes:
    """Inverse of pcm16_to_float (same 32768 scale), so PCM survives a round trip."""
    return np.clip(np.rint(samples * 32768.0), -32768, 32767).astype("<i2").tobytes()


def pcm16_to_float(pcm16: bytes) -> np.ndarray:
    return np.frombuffer(pcm16, dtype="<i2").astype(np.float32) / 32768.0


def resample(samples: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    """Linear-interpolation resampling: cheap, and good enough for speech
    going into Whisper or out to a phone-grade speaker."""
    if src_rate == dst_rate or len(samples) == 0:
        return samples.astype(np.float32, copy=False)
    n = max(1, int(round(len(samples) * dst_rate / src_rate)))
    x_new = np.linspace(0, len(samples) - 1, n)
    return np.interp(x_new, np.arange(len(samples)), samples).astype(np.float32)


def resample_pcm16(pcm16: bytes, src_rate: int, dst_rate: int) -> bytes:
    if src_rate == dst_rate:
        return pcm16
    return float_to_pcm16(resample(pcm16_to_float(pcm16), src_rate, dst_rate))


def rms_dbfs(pcm16: bytes) -> float:
    x = pcm16_to_float(pcm16)
    if len(x) == 0:
        return -120.0
    return float(20 * np.log10(max(np.sqrt(np.mean(x * x)), 1e-6)))


def duration_ms(pcm16: bytes, sample_rate: int = SAMPLE_RATE) -> float:
    return len(pcm16) / 2 / sample_rate * 1000.0


def wav_bytes(pcm16: bytes, sample_rate: int) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm16)
    return buf.getvalue()


def write_wav(path: str | Path, pcm16: bytes, sample_rate: int) -> None:
    Path(path).write_bytes(wav_bytes(pcm16, sample_rate))


class AudioFormatError(ValueError):
    """The audio is not something we can turn into PCM16 mono."""


WAV_MIN_RATE, WAV_MAX_RATE = 4000, 192000
WAV_MAX_CHANNELS = 2
_UNKNOWN_LENGTH = 0x7FFF0000
"""A data chunk claiming ~2 GiB or more: what streaming writers (arecord,
ffmpeg to a pipe) put there when they do not know the length yet. Such a
claim is read as 'until the end of the file', not as truncation."""


def read_wav(data: bytes | str | Path, target_rate: int = SAMPLE_RATE, *, max_seconds: float = 300) -> bytes:
    """Any PCM16 WAV (mono or stereo, 4-192 kHz) → PCM16 mono at target_rate.

    Everything in the header is checked before a sample is converted: an 8 KB
    file whose header says 1 Hz would otherwise resample into gigabytes.
    """
    raw = Path(data).read_bytes() if isinstance(data, (str, Path)) else data
    try:
        with wave.open(io.BytesIO(raw), "rb") as w:
            channels, width, rate, nframes = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
            _check_wav_header(channels, width, rate, nframes, max_seconds)
            frames = w.readframes(nframes)  # at most what the file holds, whatever nframes says
    except (wave.Error, EOFError, struct.error, RuntimeError) as e:
        # RuntimeError: what wave's Chunk.skip raises for a chunk size past the end of the file
        raise AudioFormatError(f"not a readable WAV file: {str(e) or type(e).__name__}") from None
    present = len(frames) // (width * channels)
    if present < nframes and nframes * width * channels < _UNKNOWN_LENGTH:
        raise AudioFormatError(f"WAV data is truncated: the header says {nframes} frames, the file holds {present}")
    _check_output_length(present, rate, target_rate, max_seconds)
    x = np.frombuffer(frames[:present * width * channels], dtype="<i2").astype(np.float32) / 32768.0
    if channels > 1:
        x = x.reshape(-1, channels).mean(axis=1)
    return float_to_pcm16(resample(x, rate, target_rate))


def _check_wav_header(channels: int, width: int, rate: int, nframes: int, max_seconds: float) -> None:
    """Format, rate, channel count and the claimed duration, before reading data."""
    if width != 2:
        raise AudioFormatError(f"WAV must be 16-bit PCM, got {8 * width}-bit")
    if not 1 <= channels <= WAV_MAX_CHANNELS:
        raise AudioFormatError(f"WAV must be mono or stereo, got {channels} channels")
    if not WAV_MIN_RATE <= rate <= WAV_MAX_RATE:
        raise AudioFormatError(f"WAV sample rate {rate} Hz is outside {WAV_MIN_RATE}-{WAV_MAX_RATE} Hz")
    if nframes * width * channels < _UNKNOWN_LENGTH and nframes / rate > max_seconds:
        raise AudioFormatError(f"audio is {nframes / rate:.1f} s long, over the {max_seconds:g} s limit")


def _check_output_length(frames: int, rate: int, target_rate: int, max_seconds: float) -> None:
    """Refuse before resampling when the output would exceed max_seconds; the
    same length resample() will produce."""
    out = max(1, round(frames * target_rate / rate)) if frames else 0
    if out > max_seconds * target_rate:
        raise AudioFormatError(f"audio is {out / target_rate:.1f} s long, over the {max_seconds:g} s limit")


def split_frames(pcm16: bytes, frame_ms: int = 60, sample_rate: int = SAMPLE_RATE) -> list[bytes]:
    """Cut PCM into client-sized frames (xiaozhi sends 60 ms)."""
    step = sample_rate * frame_ms // 1000 * 2
    return [pcm16[i:i + step] for i in range(0, len(pcm16), step)]


def silence(ms: int, sample_rate: int = SAMPLE_RATE) -> bytes:
    return b"\x00\x00" * (sample_rate * ms // 1000)
