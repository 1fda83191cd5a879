"""A stage's provider as its users see it: the configured failover chain.

Sessions and ingress replicas build their STT, LLM and TTS here, so both get
the same chain (`<stage>.provider` then `<stage>.fallback`, minus links whose
key is missing), each link behind this process's circuit breaker, local
models reached through their pool and cloud clients opened in place.
"""

from __future__ import annotations

from typing import Any

from actors.config import AppConfig
from actors.providers import build_llm, registry
from actors.providers.adapters.fallback import FallbackLLM, FallbackSTT, FallbackTTS, build_chain
from actors.providers.adapters.key_limits import limited
from actors.providers.adapters.retry import with_retries
from actors.providers.base import SAMPLE_RATE


def _gated(stage: str, name: str, provider: Any, config: AppConfig) -> Any:
    """A cloud provider behind its key's cluster-wide limits when configured
    (each attempt takes a lease, none is held while backing off), then the
    retries its section declares."""
    settings = registry.section(config, stage, name)  # type: ignore[arg-type]
    limits = config.resilience.key_limits
    if limits and settings is not None and getattr(settings, "api_key", None) is None:
        # a key written in a config file has no variable to name its limits by
        provider = limited(stage, provider, getattr(settings, "api_key_env", None), limits, config.server.namespace)
    return with_retries(stage, provider, settings)


def chained_stt(config: AppConfig) -> FallbackSTT:
    from actors.pools import stt_provider

    chain = build_chain("stt", registry.usable_chain(config, "stt"),
                        lambda n: _gated("stt", n, stt_provider(n, config), config), config.resilience)
    return FallbackSTT(chain, max_replay_bytes=int(config.stt.max_utterance_s * SAMPLE_RATE * 2))


def chained_llm(config: AppConfig) -> FallbackLLM:
    return FallbackLLM(build_chain("llm", registry.usable_chain(config, "llm"),
                                   lambda n: _gated("llm", n, build_llm(n, config), config), config.resilience))


def chained_tts(config: AppConfig) -> FallbackTTS:
    from actors.pools import tts_provider

    return FallbackTTS(build_chain("tts", registry.usable_chain(config, "tts"),
                                   lambda n: _gated("tts", n, tts_provider(n, config), config), config.resilience))
