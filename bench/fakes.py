"""Providers with fixed, known latencies, so the server's own share of a
turn is the measured total minus these delays. Plugged in by configuration
(`stt.provider: bench.fakes:FixedDelaySTT`, ...); fakes live here, never in
the product package."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np

from actors.audio import float_to_pcm16
from actors.config import AppConfig
from actors.providers.base import LLM, STT, TTS, AudioSegment, ChatMessage, LLMChunk, ToolSpec

STT_FINAL_S = 0.300
LLM_FIRST_TOKEN_S = 0.400
TTS_FIRST_AUDIO_S = 0.150
TRANSCRIPT = "what is twelve times seven"
SHORT_REPLY = "Twelve times seven is eighty-four."
LONG_REPLY = ("Here is a long answer, so that there is time to interrupt it. " * 6).strip()
SPOKEN_S_PER_WORD = 0.3
MODELS_LOADED = 0


class FixedDelaySTT(STT):
    def __init__(self, config: AppConfig) -> None:
        global MODELS_LOADED
        MODELS_LOADED += 1

    async def transcribe(self, pcm16: bytes) -> str:
        await asyncio.sleep(STT_FINAL_S)
        return TRANSCRIPT


class FixedDelayLLM(LLM):
    """Answers long when asked to (a barge-in run needs a reply to cut)."""

    label = "fixed-delay fake LLM"

    def __init__(self, config: AppConfig) -> None:
        pass

    async def stream(self, messages: list[ChatMessage], tools: list[ToolSpec]) -> AsyncIterator[LLMChunk]:
        await asyncio.sleep(LLM_FIRST_TOKEN_S)
        long = "long" in (messages[-1].content if messages else "")
        for word in (LONG_REPLY if long else SHORT_REPLY).split():
            yield LLMChunk(text=word + " ")


class FixedDelayTTS(TTS):
    """A tone as long as the sentence would take to say (0.3 s a word)."""

    sample_rate = 16000

    def __init__(self, config: AppConfig) -> None:
        global MODELS_LOADED
        MODELS_LOADED += 1

    async def synthesize(self, text: str) -> AudioSegment:
        await asyncio.sleep(TTS_FIRST_AUDIO_S)
        seconds = max(0.3, SPOKEN_S_PER_WORD * len(text.split()))
        t = np.arange(int(seconds * self.sample_rate)) / self.sample_rate
        tone = 0.3 * np.sin(2 * np.pi * 220 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))
        return AudioSegment(float_to_pcm16(tone), self.sample_rate)


class InSessionFixedDelaySTT(FixedDelaySTT):
    """The same STT opened by the session itself, as a cloud client is
    (`pooled = False`): the path without the pool's two hops a turn."""

    pooled = False


class InSessionFixedDelayTTS(FixedDelayTTS):
    """As InSessionFixedDelaySTT, for speech synthesis."""

    pooled = False


def known_delay_ms(end_silence_ms: int, pause_ms: int | None = None, preemptive: bool = False) -> float:
    """End of user speech → first reply audio if the server itself took no time.

    Without `pause_ms`: the VAD's end-of-speech wait, then each fake's delay
    in turn. With it (`stt.decode_at_pause`: the batch STT decodes at the
    pause, `vad.pause_ms` into the silence): the decode overlaps the wait,
    and with `preemptive` generation so does the LLM's first token (the reply
    starts on the pause's transcript, released when the end is decided)."""
    stt, llm, tts = 1000 * STT_FINAL_S, 1000 * LLM_FIRST_TOKEN_S, 1000 * TTS_FIRST_AUDIO_S
    if pause_ms is None:
        return end_silence_ms + stt + llm + tts
    if preemptive:
        return max(end_silence_ms, pause_ms + stt + llm) + tts
    return max(end_silence_ms, pause_ms + stt) + llm + tts