"""Uploaded audio → PCM16 mono 16 kHz, for the HTTP API.

Clients upload whatever their platform records: browsers produce WebM/Opus or
Ogg/Opus, phones and tools produce WAV or MP3, embedded clients post raw PCM.
Everything downstream (VAD, STT) wants one format, so this module is the single
gate that turns an upload into PCM16 mono at SAMPLE_RATE or refuses it with an
AudioFormatError whose message says what was wrong (the API maps it to a 4xx).

The format is sniffed from magic bytes first because content types from
clients are often wrong or generic; the content type (and then the filename
extension) only decides when the bytes carry no signature, as with raw PCM.
Compressed formats go through PyAV (FFmpeg), whose wheels ship the Opus and MP3
decoders; resampling and channel mixing reuse the helpers in actors.audio so
every path produces identical PCM.
"""

from __future__ import annotations

import io
from collections.abc import Iterable

import av
import numpy as np

from actors.audio import (
    SAMPLE_RATE,
    AudioFormatError,
    float_to_pcm16,
    pcm16_to_float,
    read_wav,
    resample,
)

SUPPORTED_FORMATS: tuple[str, ...] = ("wav", "pcm", "opus", "mp3")

# Container formats we let FFmpeg demux. Naming the demuxer explicitly (instead
# of letting FFmpeg probe) keeps arbitrary FFmpeg formats off the upload path.
_DEMUXERS = {"ogg": "ogg", "webm": "matroska", "mp3": "mp3"}

_PCM_TYPES = ("audio/l16", "audio/pcm", "audio/x-pcm", "audio/raw")
_CONTENT_TYPES = {
    "audio/wav": "wav", "audio/x-wav": "wav", "audio/wave": "wav", "audio/vnd.wave": "wav",
    "audio/ogg": "ogg", "audio/opus": "ogg", "application/ogg": "ogg",
    "audio/webm": "webm", "video/webm": "webm",
    "audio/mpeg": "mp3", "audio/mp3": "mp3", "audio/mpeg3": "mp3", "audio/x-mpeg-3": "mp3",
}
_EXTENSIONS = {
    "wav": "wav", "wave": "wav", "ogg": "ogg", "oga": "ogg", "opus": "ogg",
    "webm": "webm", "weba": "webm", "mp3": "mp3", "pcm": "pcm", "raw": "pcm", "l16": "pcm",
}

# Signatures of things people upload by mistake, so the error can say what it is.
_FOREIGN_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"%PDF", "a PDF document"),
    (b"PK\x03\x04", "a ZIP archive"),
    (b"fLaC", "FLAC audio"),
)

_MIN_RATE, _MAX_RATE = 4000, 192000


def decode_upload(
    data: bytes,
    content_type: str | None = None,
    filename: str | None = None,
    declared_rate: int | None = None,
    max_seconds: float = 300,
) -> bytes:
    """Decode an uploaded audio file to PCM16 mono at SAMPLE_RATE (16 kHz).

    ``declared_rate`` (or a ``rate=`` content-type parameter) gives the sample
    rate of raw PCM, which has no header to carry it. Raises AudioFormatError
    for unsupported, corrupt, empty, sample-less or too-long input.
    """
    if not data:
        raise AudioFormatError("empty upload: no audio data")
    if declared_rate is not None:
        _check_rate(declared_rate, "declared sample rate")
    mime, params = _parse_content_type(content_type)
    kind = _detect_kind(data, mime, filename, declared_rate)
    if kind == "wav":
        pcm = read_wav(data, SAMPLE_RATE, max_seconds=max_seconds)
    elif kind == "pcm":
        pcm = _decode_raw_pcm(data, _pcm_rate(params, declared_rate), _pcm_channels(params), max_seconds)
    else:
        pcm = _decode_container(data, _DEMUXERS[kind], max_seconds)
    if not pcm:
        raise AudioFormatError(f"{kind} upload decoded to no audio samples")
    _check_duration(len(pcm) // 2, SAMPLE_RATE, max_seconds)
    return pcm


def frame_to_mono(frame: av.AudioFrame) -> np.ndarray:
    """A decoded PyAV frame of any sample format/layout → float32 mono in [-1, 1).

    Decoders pick their own output format (Opus gives fltp, MP3 s16p/fltp, some
    give packed ints), so callers must not assume one.
    """
    arr = frame.to_ndarray()
    channels = frame.layout.nb_channels
    if frame.format.is_planar:
        planes = arr.reshape(channels, -1)
    else:
        planes = arr.reshape(-1, channels).T
    x = _to_float(planes)
    return x.mean(axis=0).astype(np.float32) if channels > 1 else x[0].astype(np.float32)


def _to_float(arr: np.ndarray) -> np.ndarray:
    """Integer or float samples → float in [-1, 1), matching pcm16_to_float's scale."""
    if arr.dtype.kind == "f":
        return arr.astype(np.float32, copy=False)
    if arr.dtype.kind == "u":  # unsigned formats are offset by half their range
        half = 2 ** (8 * arr.dtype.itemsize - 1)
        return (arr.astype(np.float64) - half) / half
    return arr.astype(np.float64) / 2 ** (8 * arr.dtype.itemsize - 1)


def _parse_content_type(content_type: str | None) -> tuple[str, dict[str, str]]:
    """'audio/L16; rate=16000' → ('audio/l16', {'rate': '16000'})."""
    if not content_type:
        return "", {}
    mime, *rest = content_type.split(";")
    params = {}
    for item in rest:
        key, _, value = item.partition("=")
        if key.strip():
            params[key.strip().lower()] = value.strip().strip('"')
    return mime.strip().lower(), params


def _detect_kind(data: bytes, mime: str, filename: str | None, declared_rate: int | None) -> str:
    """Pick the decoder: magic bytes, then content type, then file extension."""
    sniffed = _sniff(data, mime)
    if sniffed:
        return sniffed
    _refuse_foreign(data, mime)
    if mime in _PCM_TYPES or (mime == "application/octet-stream" and declared_rate):
        return "pcm"
    if mime in _CONTENT_TYPES:
        return _CONTENT_TYPES[mime]
    ext = filename.rsplit(".", 1)[-1].lower() if filename and "." in filename else ""
    if ext in _EXTENSIONS:
        return _EXTENSIONS[ext]
    if declared_rate and not mime:
        return "pcm"
    described = f"content type {mime!r}" if mime else "no content type"
    raise AudioFormatError(
        f"unrecognised audio format ({described}, no known file signature); "
        f"supported: {', '.join(SUPPORTED_FORMATS)} (raw PCM needs audio/L16;rate=N)"
    )


def _sniff(data: bytes, mime: str) -> str | None:
    """Recognise the file signatures of the supported formats."""
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return "wav"
    if data[:4] == b"OggS":
        return "ogg"
    if data[:4] == b"\x1a\x45\xdf\xa3":
        return "webm"
    if data[:3] == b"ID3":
        return "mp3"
    # A bare MPEG frame sync is only two bytes, which raw PCM can start with by
    # chance, so trust it only when the client did not say the data is raw PCM.
    if mime not in _PCM_TYPES and _is_mpeg_frame_header(data[:4]):
        return "mp3"
    return None


def _is_mpeg_frame_header(header: bytes) -> bool:
    """11-bit sync plus valid layer, bitrate and sample-rate fields."""
    if len(header) < 4 or header[0] != 0xFF or header[1] & 0xE0 != 0xE0:
        return False
    version, layer = (header[1] >> 3) & 0x3, (header[1] >> 1) & 0x3
    bitrate, rate = header[2] >> 4, (header[2] >> 2) & 0x3
    return version != 1 and layer != 0 and bitrate != 0xF and rate != 0x3


def _refuse_foreign(data: bytes, mime: str) -> None:
    """Give a precise error for non-audio uploads instead of decoding noise."""
    for magic, what in _FOREIGN_MAGIC:
        if data.startswith(magic):
            raise AudioFormatError(
                f"upload looks like {what}, not supported audio; "
                f"supported: {', '.join(SUPPORTED_FORMATS)}"
            )
    if data[:4] == b"RIFF":
        raise AudioFormatError(f"RIFF file of type {data[8:12]!r} is not a WAV file")
    if mime.startswith("text/") or _looks_like_text(data):
        raise AudioFormatError("upload looks like text, not audio")


def _looks_like_text(data: bytes) -> bool:
    """Printable UTF-8 in the first 512 bytes: PCM audio essentially never is."""
    head = data[:512]
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        try:  # the cut may have split a multi-byte character
            text = head[:-3].decode("utf-8") if len(head) > 3 else ""
        except UnicodeDecodeError:
            return False
    return bool(text) and all(ch.isprintable() or ch in "\r\n\t" for ch in text)


def _pcm_rate(params: dict[str, str], declared_rate: int | None) -> int:
    """The content-type rate= wins over declared_rate; default SAMPLE_RATE."""
    raw = params.get("rate", declared_rate if declared_rate is not None else SAMPLE_RATE)
    if isinstance(raw, str):
        text = raw.strip()
        # int() alone would take '１６０００', '1_6000' and 4,000-digit strings
        if not (text.isascii() and text.isdigit() and len(text) <= 9):
            raise AudioFormatError(f"invalid PCM sample rate {raw[:32]!r}")
        raw = int(text)
    return _check_rate(raw, "PCM sample rate")


def _check_rate(rate: object, what: str) -> int:
    """An int (not bool) within _MIN_RATE.._MAX_RATE: every rate used as a
    divisor or resampling ratio goes through here first."""
    if isinstance(rate, bool) or not isinstance(rate, int):
        raise AudioFormatError(f"{what} must be an integer number of Hz, got {str(rate)[:32]!r}")
    if not _MIN_RATE <= rate <= _MAX_RATE:
        raise AudioFormatError(f"{what} {rate} outside {_MIN_RATE}-{_MAX_RATE} Hz")
    return rate


def _pcm_channels(params: dict[str, str]) -> int:
    raw = params.get("channels", "1")
    if raw not in ("1", "2"):
        raise AudioFormatError(f"raw PCM must have 1 or 2 channels, got {raw!r}")
    return int(raw)


def _decode_raw_pcm(data: bytes, rate: int, channels: int, max_seconds: float) -> bytes:
    """Raw PCM16 little-endian (interleaved if stereo) → mono at SAMPLE_RATE;
    the duration is checked before resampling, which is where size multiplies."""
    if len(data) % (2 * channels):
        raise AudioFormatError(
            f"raw PCM16 length {len(data)} bytes is not a whole number of "
            f"{channels}-channel 16-bit samples"
        )
    _check_duration(len(data) // (2 * channels), rate, max_seconds)
    x = pcm16_to_float(data)
    if channels > 1:
        x = x.reshape(-1, channels).mean(axis=1)
    return float_to_pcm16(resample(x, rate, SAMPLE_RATE))


def _decode_container(data: bytes, demuxer: str, max_seconds: float) -> bytes:
    """Ogg/WebM/MP3 via PyAV → PCM16 mono at SAMPLE_RATE."""
    try:
        with av.open(io.BytesIO(data), format=demuxer) as container:
            if not container.streams.audio:
                raise AudioFormatError(f"{demuxer} file has no audio stream")
            stream = container.streams.audio[0]
            if stream.sample_rate:  # 0 = not known before decoding; each frame is checked then
                _check_rate(stream.sample_rate, f"{demuxer} stream sample rate")
            return _frames_to_pcm(container.decode(stream), max_seconds)
    except AudioFormatError:
        raise
    except (av.error.FFmpegError, ValueError, IndexError, UnicodeDecodeError) as e:
        # FFmpeg's own errors, and PyAV's when a corrupt frame has an
        # impossible layout (to_ndarray/reshape) or undecodable metadata
        raise AudioFormatError(f"cannot decode {demuxer} audio: {e}") from None


def _frames_to_pcm(frames: Iterable[av.AudioFrame], max_seconds: float) -> bytes:
    """Mix down and resample decoded frames, stopping as soon as the audio is
    too long so a small compressed bomb cannot expand into gigabytes."""
    runs: list[tuple[int, list[np.ndarray]]] = []  # consecutive frames sharing a rate
    seconds = 0.0
    for frame in frames:
        rate = _check_rate(frame.sample_rate, "decoded sample rate")
        if not runs or runs[-1][0] != rate:
            runs.append((rate, []))
        runs[-1][1].append(frame_to_mono(frame))
        seconds += frame.samples / rate
        if seconds > max_seconds:
            raise AudioFormatError(f"audio is longer than the {max_seconds:g} s limit")
    parts = [resample(np.concatenate(chunks), rate, SAMPLE_RATE) for rate, chunks in runs]
    return float_to_pcm16(np.concatenate(parts)) if parts else b""


def _check_duration(samples: int, rate: int, max_seconds: float) -> None:
    if samples / rate > max_seconds:
        raise AudioFormatError(
            f"audio is {samples / rate:.1f} s long, over the {max_seconds:g} s limit"
        )
