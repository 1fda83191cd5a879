"""Whisper in a short encoder window (`stt.encoder_window_s`): the same
words as the 30 s window at a fraction of the cost, and a decode that loops
is redone in the full window. The real embedded models, no Ray."""

from __future__ import annotations

import numpy as np
import pytest

from actors.audio import float_to_pcm16, resample_pcm16
from actors.providers.local.tts import PiperTTS
from actors.providers.local.whisper import FULL_WINDOW_S, WhisperSTT, _looks_like_a_loop


@pytest.fixture(scope="module")
def voice() -> PiperTTS:
    return PiperTTS()


def spoken(voice: PiperTTS, text: str) -> bytes:
    """Piper without its sampling noise: the same audio every run, so what
    Whisper hears does not change between runs (with the noise, "Hello."
    was once heard as "Oh well.")."""
    from piper import SynthesisConfig

    steady = SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0)
    audio = np.concatenate([c.audio_float_array for c in voice._voice.synthesize(text, syn_config=steady)])
    return resample_pcm16(float_to_pcm16(audio), voice.sample_rate, 16000)


def test_window_follows_the_speech_up_to_the_full_window() -> None:
    stt = WhisperSTT(encoder_window_s=10)
    assert stt.window_for(1.5) == 10
    assert stt.window_for(11.2) == 13  # the speech and a second of silence
    assert stt.window_for(29.5) == FULL_WINDOW_S
    assert WhisperSTT(encoder_window_s=0).window_for(1.5) == FULL_WINDOW_S


def test_loop_test_is_whispers_compression_ratio() -> None:
    assert _looks_like_a_loop("Hello? " * 24)
    assert _looks_like_a_loop("Tell me about the Rosetta Stone. " * 6)
    assert not _looks_like_a_loop("Tell me about the Rosetta Stone.")
    assert not _looks_like_a_loop("My favorite color is green and I live in a small town near the sea.")
    assert not _looks_like_a_loop("")


def test_short_window_hears_the_question(voice: PiperTTS) -> None:
    stt = WhisperSTT(encoder_window_s=10.0)  # a float, as the config gives it
    words = stt.transcribe_sync(spoken(voice, "What is twelve times seven?")).lower()
    assert ("12" in words or "twelve" in words) and ("7" in words or "seven" in words), words
    assert stt.decodes == {"short_window": 1, "full_window": 0, "loop_redone": 0}


def test_a_looping_decode_is_redone_in_the_full_window(voice: PiperTTS) -> None:
    # a 3 s window is too short for Whisper: it repeats short utterances until the token cap
    stt = WhisperSTT(encoder_window_s=3)
    texts = [stt.transcribe_sync(spoken(voice, t)) for t in ("Hello.", "Yes.", "Tell me about the Rosetta Stone.")]
    assert stt.decodes["loop_redone"] >= 1, (stt.decodes, texts)
    assert stt.decodes["full_window"] == stt.decodes["loop_redone"]
    assert all(t and not _looks_like_a_loop(t) for t in texts), texts
    assert "hello" in texts[0].lower() and "yes" in texts[1].lower(), texts
