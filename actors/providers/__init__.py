"""Provider factories: configuration in, a provider implementing base.py out.
Which names exist is the vendors' business (actors/providers/registry.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from actors.providers import registry
from actors.providers.base import LLM, STT, TTS, VAD

if TYPE_CHECKING:  # the config imports provider-side models (tools): no cycle at run time
    from actors.config import AppConfig


def build_vad(config: AppConfig) -> VAD:
    return registry.build("vad", config.vad.provider, config)


def build_stt(name: str, config: AppConfig) -> STT:
    return registry.build("stt", name, config)


def build_tts(name: str, config: AppConfig) -> TTS:
    return registry.build("tts", name, config)


def build_llm(name: str, config: AppConfig) -> LLM:
    return registry.build("llm", name, config)
