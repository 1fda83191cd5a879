"""Provider factories: configuration in, a provider implementing base.py out.

Imports are lazy so a process only loads the models it actually uses.
"""

from __future__ import annotations

import importlib
from typing import Any

from actors.config import AppConfig
from actors.providers.base import LLM, STT, TTS, VAD


def _plugin(name: str, config: AppConfig) -> Any | None:
    """`package.module:Class` → Class(config); None for a built-in name."""
    if ":" not in name:
        return None
    module, _, attr = name.partition(":")
    return getattr(importlib.import_module(module), attr)(config)


def build_vad(config: AppConfig) -> VAD:
    from actors.providers.local_vad import TwoStageVAD, WebRtcVAD

    if (plugin := _plugin(config.vad.provider, config)) is not None:
        return plugin
    if config.vad.provider == "webrtc":
        return WebRtcVAD(config.vad.webrtc_aggressiveness)
    return TwoStageVAD(config.vad.webrtc_aggressiveness, config.vad.silero_threshold)


def build_stt(name: str, config: AppConfig) -> STT:
    if (plugin := _plugin(name, config)) is not None:
        return plugin
    if name == "local-whisper":
        from actors.providers.local_whisper import WhisperSTT

        return WhisperSTT(config.stt.model_path, config.stt.language, config.stt.cpu_threads,
                          workers=config.pools.stt.max_concurrency)
    raise ValueError(f"unknown STT provider {name!r}")


def build_tts(name: str, config: AppConfig) -> TTS:
    if (plugin := _plugin(name, config)) is not None:
        return plugin
    from actors.providers.local_tts import EspeakTTS, PiperTTS

    if name == "local-piper":
        return PiperTTS(config.tts.voice_model)
    if name == "local-espeak":
        return EspeakTTS()
    raise ValueError(f"unknown TTS provider {name!r}")


def build_llm(name: str, config: AppConfig) -> LLM:
    if (plugin := _plugin(name, config)) is not None:
        return plugin
    if name == "local-dialogue":
        from actors.knowledge import KnowledgeBase
        from actors.providers.local_dialogue import LocalDialogueEngine

        kb = KnowledgeBase.load(config.resolve_path(config.llm.knowledge_base)) if config.llm.knowledge_base else None
        persona = config.persona()
        return LocalDialogueEngine(kb, persona_name=persona.name, chunk_delay_s=config.llm.chunk_delay_s)
    raise ValueError(f"unknown LLM provider {name!r}")
