"""Config in, an embedded provider out (imports stay inside each function, so
a process loads only the models it uses)."""

from __future__ import annotations

from typing import Any

from actors.config import AppConfig


def two_stage_vad(config: AppConfig) -> Any:
    from actors.providers.local.vad import TwoStageVAD

    return TwoStageVAD(config.vad.webrtc_aggressiveness, config.vad.silero_threshold)


def webrtc_vad(config: AppConfig) -> Any:
    from actors.providers.local.vad import WebRtcVAD

    return WebRtcVAD(config.vad.webrtc_aggressiveness)


def whisper(config: AppConfig) -> Any:
    from actors.providers.local.whisper import WhisperSTT

    return WhisperSTT(config.stt.model_path, config.stt.language, config.stt.cpu_threads,
                      workers=config.pools.stt.max_concurrency, encoder_window_s=config.stt.encoder_window_s)


def piper(config: AppConfig) -> Any:
    from actors.providers.local.tts import PiperTTS

    return PiperTTS(config.tts.voice_model)


def espeak(config: AppConfig) -> Any:
    from actors.providers.local.tts import EspeakTTS

    return EspeakTTS()


def dialogue_engine(config: AppConfig) -> Any:
    from actors.agent.knowledge import KnowledgeBase
    from actors.providers.local.dialogue import LocalDialogueEngine

    kb = KnowledgeBase.load(config.resolve_path(config.llm.knowledge_base)) if config.llm.knowledge_base else None
    return LocalDialogueEngine(kb, persona_name=config.persona().name, chunk_delay_s=config.llm.chunk_delay_s)
