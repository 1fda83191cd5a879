"""A pooled plug-in STT whose answers show what it was given, for the pool
channel's tests: `b"fail"` raises as a broken model would, input starting
`b"slow"` takes 0.5 s, anything else answers at once."""

from __future__ import annotations

import asyncio

from actors.config import AppConfig
from actors.providers.base import STT


class ScriptedSTT(STT):
    def __init__(self, config: AppConfig) -> None:
        pass

    async def transcribe(self, pcm16: bytes) -> str:
        if pcm16 == b"fail":
            raise RuntimeError("the model failed")
        if pcm16.startswith(b"slow"):
            await asyncio.sleep(0.5)
        return f"heard {len(pcm16)} bytes"
