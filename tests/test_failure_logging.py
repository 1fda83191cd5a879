"""Issue 8, item 14: a provider or child failure is logged with its
traceback and the session id, and the client gets a stable error code.
SessionCore without Ray, with providers that fail on purpose."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from actors.config import load_config
from actors.events import ErrorCode, ErrorEvent
from actors.providers import build_vad
from actors.providers.base import LLM, STT, TTS, AudioSegment, ChatMessage, LLMChunk, ProviderError, ToolSpec
from actors.session_core import SessionCore


class SilentSTT(STT):
    async def transcribe(self, pcm16: bytes) -> str:
        return ""


class BrokenLLM(LLM):
    async def stream(self, messages: list[ChatMessage], tools: list[ToolSpec]) -> AsyncIterator[LLMChunk]:
        raise RuntimeError("vendor SDK exploded")
        yield LLMChunk()  # pragma: no cover - makes this an async generator


class QuietTTS(TTS):
    async def synthesize(self, text: str) -> AudioSegment:
        raise ProviderError("tts.failed", "no voice today")


async def test_llm_failure_is_logged_with_session_and_traceback_and_reported(caplog):
    config = load_config(env={"VOICE_ACTORS__SESSION__HISTORY_DB": ""})
    core = SessionCore("sess-log-1", config, vad=build_vad(config), stt=SilentSTT(), llm=BrokenLLM(), tts=QuietTTS())
    core.start()
    events = core.subscribe()
    with caplog.at_level(logging.WARNING):
        core.send_text("hello there")
        error = None
        async with asyncio.timeout(10):
            while error is None:
                ev = await events.get()
                if isinstance(ev, ErrorEvent):
                    error = ev
    await core.close()
    assert error.code == ErrorCode.LLM_FAILED and "RuntimeError" in error.message
    record = next(r for r in caplog.records if "sess-log-1" in r.getMessage())
    assert record.exc_info is not None and "vendor SDK exploded" in str(record.exc_info[1])


async def test_a_child_crash_is_logged_with_session_and_traceback(caplog):
    config = load_config(env={"VOICE_ACTORS__SESSION__HISTORY_DB": ""})
    core = SessionCore("sess-log-2", config, vad=build_vad(config), stt=SilentSTT(), llm=BrokenLLM(), tts=QuietTTS())
    core.start()
    events = core.subscribe()

    async def explode(message: object) -> None:
        raise ZeroDivisionError("a bug in a child")

    core.dialogue.handle = explode  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR):
        core.send_text("hello")
        async with asyncio.timeout(10):
            while not isinstance(ev := await events.get(), ErrorEvent):
                pass
    await core.close()
    assert ev.code == ErrorCode.INTERNAL and "ZeroDivisionError" in ev.message
    record = next(r for r in caplog.records if "sess-log-2" in r.getMessage())
    assert "dialogue" in record.getMessage() and record.exc_info[0] is ZeroDivisionError
