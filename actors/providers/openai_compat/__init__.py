"""Any OpenAI-compatible chat endpoint as the session's LLM (DashScope's
compatible mode by default; OpenAI, vLLM, Ollama and llama.cpp's server alike).

`llm.provider: openai-compatible`, settings in `llm.openai_compat`
(`OpenAICompatConfig` in `llm.py`). Importing this package costs nothing: the
registry names the factory by import path, and `llm.py` itself imports the
`openai` SDK (~1.4 s) only when a provider is built.
"""

from actors.providers.registry import ProviderSpec

_LLM = "actors.providers.openai_compat.llm"

PROVIDERS = {
    ("llm", "openai-compatible"): ProviderSpec(
        f"{_LLM}:OpenAICompatLLM.from_app_config",
        section="openai_compat",
        config_model=f"{_LLM}:OpenAICompatConfig",
    ),
}
