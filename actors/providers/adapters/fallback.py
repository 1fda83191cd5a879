"""Failover chains."""

from __future__ import annotations

import logging
from typing import Any

from actors.providers.base import TTS, AudioSegment, ProviderError

log = logging.getLogger(__name__)


class FallbackTTS(TTS):
    """Tries each TTS in order; the first that answers wins. Later providers
    are built only when needed, so an unused fallback costs nothing."""

    def __init__(self, primary: TTS, *fallbacks: Any) -> None:
        self._chain: list[Any] = [primary, *fallbacks]

    async def synthesize(self, text: str) -> AudioSegment:
        last: Exception | None = None
        for i, entry in enumerate(self._chain):
            tts = entry() if callable(entry) and not isinstance(entry, TTS) else entry
            self._chain[i] = tts
            try:
                return await tts.synthesize(text)
            except Exception as e:
                log.warning("TTS provider %s failed (%s); trying the next", type(tts).__name__, e)
                last = e
        raise ProviderError("tts.failed", f"every TTS provider failed: {last}")


