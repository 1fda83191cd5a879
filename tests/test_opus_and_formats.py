"""Opus packet codec and upload decoding (no Ray).

Test audio is synthesised here (a speech-like AM-modulated gliding tone) so the
tests need no fixtures and the expected length/energy is known exactly."""

from __future__ import annotations

import io
import av
import numpy as np
import pytest

from actors.audio import AudioFormatError, float_to_pcm16, pcm16_to_float, wav_bytes
from actors.audio_formats import SUPPORTED_FORMATS, decode_upload
from actors.protocols.opus import OpusDecodeError, OpusDecoder, OpusEncoder


NOISE = np.random.default_rng(7).bytes(256)  # fixed, so sniffing results are reproducible
# TOC code 3 claiming 63 frames of 10 ms: 630 ms is over Opus's 120 ms packet
# limit (RFC 6716 §3.2.5), so every decoder must reject it.
BAD_OPUS = bytes([0x03, 0xFF]) + NOISE[:20]


def speechlike(seconds: float, rate: int, channels: int = 1) -> np.ndarray:
    """Gliding 120-400 Hz tone with harmonics, amplitude-modulated at a
    syllable rate (4 Hz): roughly the spectrum and envelope of voiced speech."""
    t = np.arange(int(seconds * rate)) / rate
    f0 = 200 + 80 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    tone = np.sin(phase) + 0.5 * np.sin(2 * phase) + 0.25 * np.sin(3 * phase)
    x = (0.25 * tone * (0.55 + 0.45 * np.sin(2 * np.pi * 4 * t))).astype(np.float32)
    return np.stack([x] * channels, axis=1) if channels > 1 else x


def best_correlation(a: np.ndarray, b: np.ndarray, max_lag: int = 400) -> float:
    """Highest normalised correlation of a with b delayed by 0..max_lag samples
    (codecs add a small algorithmic delay)."""
    n = min(len(a), len(b)) - max_lag
    best = -1.0
    for lag in range(max_lag + 1):
        x, y = a[:n], b[lag:lag + n]
        best = max(best, float(np.dot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y) + 1e-12)))
    return best


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


def encode_all(pcm: bytes, rate: int, chunk: int = 1234) -> list[bytes]:
    """Feed the encoder odd-sized chunks, as a TTS stream would."""
    enc = OpusEncoder(rate, frame_ms=60)
    packets: list[bytes] = []
    for i in range(0, len(pcm), chunk):
        packets += enc.encode(pcm[i:i + chunk])
    return packets + enc.flush()


def samples_at_48k(packet: bytes) -> int:
    """Duration of one packet, measured by decoding it (decoders output 48 kHz)."""
    frames = av.CodecContext.create("opus", "r").decode(av.Packet(packet))
    assert all(f.sample_rate == 48000 for f in frames)
    return sum(f.samples for f in frames)


# --------------------------------------------------------------------- Opus
def test_encoder_cuts_whole_60ms_packets_and_flush_pads_the_tail() -> None:
    pcm = float_to_pcm16(speechlike(1.0, 16000))  # 16000 samples = 16.67 frames of 960
    enc = OpusEncoder(16000, frame_ms=60)
    packets = enc.encode(pcm)
    assert len(packets) == 16
    assert enc.buffered_bytes == (16000 - 16 * 960) * 2
    tail = enc.flush()
    assert len(tail) == 1 and enc.buffered_bytes == 0
    assert enc.flush() == []
    for p in packets + tail:
        assert samples_at_48k(p) == 2880  # 60 ms at 48 kHz, not libopus's default 20 ms


def test_encoder_rejects_rates_opus_cannot_encode() -> None:
    with pytest.raises(ValueError, match="44100"):
        OpusEncoder(44100)
    with pytest.raises(ValueError):
        OpusEncoder(16000, frame_ms=30)


def test_round_trip_keeps_length_and_signal() -> None:
    x = speechlike(2.0, 16000)
    packets = encode_all(float_to_pcm16(x), 16000)
    assert len(packets) == int(np.ceil(len(x) / 960))
    dec = OpusDecoder(16000)
    y = pcm16_to_float(b"".join(dec.decode(p) for p in packets))
    assert len(y) == len(packets) * 960  # 60 ms of 16 kHz PCM per packet
    assert best_correlation(x, y) > 0.9
    assert 0.7 < rms(y[: len(x)]) / rms(x) < 1.3


def test_24k_encoder_decodes_to_any_output_rate() -> None:
    x = speechlike(1.2, 24000)
    packets = encode_all(float_to_pcm16(x), 24000)
    assert len(packets) == 20
    assert all(samples_at_48k(p) == 2880 for p in packets)
    y24 = pcm16_to_float(b"".join(OpusDecoder(24000).decode(p) for p in packets))
    y16 = pcm16_to_float(b"".join(OpusDecoder(16000).decode(p) for p in packets))
    assert len(y24) == 20 * 1440 and len(y16) == 20 * 960
    assert best_correlation(x, y24) > 0.9


def test_decoder_survives_garbage_and_empty_packets() -> None:
    x = speechlike(0.6, 16000)
    packets = encode_all(float_to_pcm16(x), 16000)
    dec = OpusDecoder(16000)
    assert len(dec.decode(packets[0])) == 960 * 2
    with pytest.raises(OpusDecodeError):
        dec.decode(BAD_OPUS)
    with pytest.raises(OpusDecodeError):
        dec.decode(b"")
    good = pcm16_to_float(dec.decode(packets[1]))
    assert len(good) == 960 and rms(good) > 0.05
    # and keeps going: the rest of the stream still decodes
    assert all(len(dec.decode(p)) == 1920 for p in packets[2:])


def test_decoder_error_is_a_value_error_with_a_reason() -> None:
    with pytest.raises(ValueError, match="invalid Opus packet"):
        OpusDecoder().decode(BAD_OPUS)


# ------------------------------------------------------------ upload decode
def write_container(fmt: str, codec: str, x: np.ndarray, rate: int) -> bytes:
    """Encode mono float audio into an in-memory container with PyAV."""
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=rate, layout="mono")
        s16 = np.asarray(np.clip(x * 32768, -32768, 32767), dtype="<i2")
        for i in range(0, len(s16), 960):
            frame = av.AudioFrame.from_ndarray(s16[i:i + 960].reshape(1, -1), format="s16", layout="mono")
            frame.sample_rate, frame.pts = rate, i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def stereo_wav(x: np.ndarray, rate: int) -> bytes:
    import wave

    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(float_to_pcm16(x.reshape(-1)))
    return buf.getvalue()


def test_stereo_44k_wav_becomes_16k_mono() -> None:
    x = speechlike(1.5, 44100, channels=2)
    pcm = decode_upload(stereo_wav(x, 44100), "audio/wav", "a.wav")
    assert abs(len(pcm) // 2 - 24000) <= 1
    assert best_correlation(speechlike(1.5, 16000), pcm16_to_float(pcm), max_lag=5) > 0.95


def test_raw_pcm_uses_rate_from_content_type() -> None:
    x = speechlike(1.0, 8000)
    pcm = decode_upload(float_to_pcm16(x), "audio/L16;rate=8000; channels=1")
    assert len(pcm) // 2 == 16000
    same = decode_upload(float_to_pcm16(speechlike(1.0, 16000)), "audio/pcm")
    assert len(same) // 2 == 16000  # default rate is 16 kHz
    octet = decode_upload(float_to_pcm16(x), "application/octet-stream", declared_rate=8000)
    assert octet == pcm


def test_ogg_opus_file_decodes() -> None:
    x = speechlike(1.0, 48000)
    data = write_container("ogg", "libopus", x, 48000)
    assert data[:4] == b"OggS"
    pcm = decode_upload(data, "application/octet-stream")  # sniffed, not trusted type
    assert abs(len(pcm) // 2 - 16000) <= 16
    assert best_correlation(speechlike(1.0, 16000), pcm16_to_float(pcm)) > 0.9


def test_webm_opus_file_decodes() -> None:
    data = write_container("webm", "libopus", speechlike(0.8, 48000), 48000)
    pcm = decode_upload(data, "audio/webm;codecs=opus")
    assert abs(len(pcm) // 2 - 12800) <= 16


def test_mp3_file_decodes() -> None:
    x = speechlike(1.0, 44100)
    data = write_container("mp3", "libmp3lame", x, 44100)
    pcm = pcm16_to_float(decode_upload(data, None, "voice.mp3"))
    assert abs(len(pcm) - 16000) <= 16
    assert best_correlation(speechlike(1.0, 16000), pcm, max_lag=100) > 0.9


def test_mp3_without_id3_is_sniffed_by_frame_sync() -> None:
    data = write_container("mp3", "libmp3lame", speechlike(0.5, 44100), 44100)
    assert data[:3] == b"ID3"
    size = int.from_bytes(bytes(b & 0x7F for b in data[6:10]), "big")  # syncsafe
    bare = data[10 + size:]
    assert bare[0] == 0xFF and bare[1] & 0xE0 == 0xE0
    assert abs(len(decode_upload(bare)) // 2 - 8000) <= 16


def test_too_long_audio_is_refused() -> None:
    wav = wav_bytes(float_to_pcm16(speechlike(2.0, 16000)), 16000)
    with pytest.raises(AudioFormatError, match="limit"):
        decode_upload(wav, max_seconds=1.0)
    ogg = write_container("ogg", "libopus", speechlike(2.0, 48000), 48000)
    with pytest.raises(AudioFormatError, match="limit"):
        decode_upload(ogg, max_seconds=1.0)


@pytest.mark.parametrize(
    ("data", "content_type", "message"),
    [
        (b"\x89PNG\r\n\x1a\n" + bytes(100), "audio/wav", "PNG"),
        (b"\x89PNG\r\n\x1a\n" + bytes(100), "application/octet-stream", "PNG"),
        (b"", "audio/L16", "empty"),
        (b"\x01\x02\x03", "audio/L16;rate=16000", "whole number"),
        (b"hello, this is not audio at all\n" * 4, None, "text"),
        (b"hello, this is not audio at all\n" * 4, "audio/L16", "text"),
        (b"fLaC" + bytes(60), "audio/flac", "FLAC"),
        (b"OggS" + NOISE[:60], "audio/ogg", "cannot decode"),
        (bytes([0x00, 0x9C]) + NOISE[:62], None, "unrecognised"),
        (wav_bytes(b"", 16000), "audio/wav", "no audio samples"),
    ],
)
def test_refuses_non_audio(data: bytes, content_type: str | None, message: str) -> None:
    with pytest.raises(AudioFormatError, match=message):
        decode_upload(data, content_type)


def test_supported_formats_are_named_in_errors() -> None:
    assert SUPPORTED_FORMATS == ("wav", "pcm", "opus", "mp3")
    with pytest.raises(AudioFormatError) as err:
        decode_upload(b"\x00\x01" * 50, "image/png")
    assert all(name in str(err.value) for name in SUPPORTED_FORMATS)
