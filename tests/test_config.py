"""The configuration model, its YAML and its environment overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from actors.config import DEFAULT_CONFIG_PATH, ConfigError, load_config


def test_default_config_is_the_offline_embedded_stack():
    cfg = load_config(env={})
    assert (cfg.vad.provider, cfg.stt.provider, cfg.llm.provider, cfg.tts.provider) == (
        "local-two-stage", "local-whisper", "local-dialogue", "local-piper")
    assert cfg.resolve_path(cfg.llm.knowledge_base).exists()
    assert cfg.persona().name == "Ava"


def test_environment_overrides_nested_fields_with_yaml_values():
    cfg = load_config(env={
        "VOICE_ACTORS__SERVER__PORT": "9123",
        "VOICE_ACTORS__VAD__END_SILENCE_MS": "450",
        "VOICE_ACTORS__TTS__PACE": "false",
        "VOICE_ACTORS__PERSONAS__GUIDE__NAME": "Max",
        "UNRELATED": "1",
    })
    assert cfg.server.port == 9123 and cfg.vad.end_silence_ms == 450 and cfg.tts.pace is False
    assert cfg.personas["guide"].name == "Max" and cfg.personas["museum-guide"].name == "Ava"


@pytest.mark.parametrize("env, field", [
    ({"VOICE_ACTORS__SERVER__PORT": "70000"}, "server.port"),
    ({"VOICE_ACTORS__VAD__WEBRTC_AGGRESSIVENESS": "7"}, "vad.webrtc_aggressiveness"),
    ({"VOICE_ACTORS__STT__PROVIDER": "nonesuch"}, "stt.provider"),
    ({"VOICE_ACTORS__SESSION__OUTPUT_SAMPLE_RATE": "12345"}, "session.output_sample_rate"),
    ({"VOICE_ACTORS__TTS__SPEED": "2"}, "tts.speed"),
])
def test_bad_configuration_names_the_field(env, field):
    with pytest.raises(ConfigError) as err:
        load_config(env=env)
    assert field in str(err.value)


def test_bad_yaml_file_is_a_clear_error(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("server: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad, env={})
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml", env={})


def test_config_path_from_environment(tmp_path: Path):
    other = tmp_path / "other.yaml"
    other.write_text(DEFAULT_CONFIG_PATH.read_text().replace("port: 8000", "port: 8111"))
    assert load_config(env={"VOICE_ACTORS_CONFIG": str(other)}).server.port == 8111


def test_the_shipped_cloud_configuration_loads_with_every_vendor_section():
    from actors.config import PROJECT_ROOT
    from actors.providers import registry

    cfg = load_config(PROJECT_ROOT / "config" / "cloud-zh.yaml", env={})
    assert (cfg.stt.provider, cfg.llm.provider, cfg.tts.provider) == ("dashscope", "openai-compatible", "dashscope")
    assert registry.section(cfg, "stt", "dashscope").language_hints == ["zh", "en"]
    assert registry.section(cfg, "llm", "openai-compatible").model == "qwen-plus"
    assert registry.section(cfg, "tts", "dashscope").voice == "longxiaochun_v2"
    assert not registry.spec("stt", "dashscope").pooled and registry.spec("stt", "local-whisper").pooled


@pytest.mark.parametrize("env, field", [
    ({"VOICE_ACTORS__STT__PROVIDER": "dashscope", "VOICE_ACTORS__STT__DASHSCOPE__MODLE": "x"}, "stt.dashscope.modle"),
    ({"VOICE_ACTORS__LLM__PROVIDER": "openai-compatible", "VOICE_ACTORS__LLM__OPENAI_COMPAT__TEMPERATURE": "hot"},
     "llm.openai_compat.temperature"),
    ({"VOICE_ACTORS__TTS__DASHSCOPE_TYPO__VOICE": "x"}, "tts.dashscope_typo"),
])
def test_vendor_sections_are_validated_by_the_vendor_at_load(env, field):
    with pytest.raises(ConfigError) as err:
        load_config(env=env)
    assert field in str(err.value)


def test_a_plugin_is_pooled_unless_its_class_says_it_is_a_remote_client():
    """A plug-in (`module:Class`) may load a model, so it gets a pool; one
    whose class says `pooled = False` is opened by the session itself, as the
    cloud providers are (no pool hop for its audio)."""
    from actors.config import load_config
    from actors.pools import stt_provider, tts_provider
    from actors.providers import registry
    from bench.fakes import InSessionFixedDelaySTT, InSessionFixedDelayTTS

    assert registry.spec("stt", "bench.fakes:FixedDelaySTT").pooled
    assert not registry.spec("stt", "bench.fakes:InSessionFixedDelaySTT").pooled
    assert not registry.spec("tts", "bench.fakes:InSessionFixedDelayTTS").pooled
    cfg = load_config(env={"VOICE_ACTORS__STT__PROVIDER": "bench.fakes:InSessionFixedDelaySTT",
                           "VOICE_ACTORS__TTS__PROVIDER": "bench.fakes:InSessionFixedDelayTTS",
                           "VOICE_ACTORS__TTS__FALLBACK": "none"})
    assert isinstance(stt_provider(cfg.stt.provider, cfg), InSessionFixedDelaySTT)  # built here: no Ray needed
    assert isinstance(tts_provider(cfg.tts.provider, cfg), InSessionFixedDelayTTS)
    from actors.pools import pooled_providers

    assert pooled_providers(cfg) == []
