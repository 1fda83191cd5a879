"""Knowledge retrieval: documents → chunks → ranked, cited hits for a prompt.

Two users, one module:
- the offline dialogue engine reads `KnowledgeBase` (whole curated entries
  from `config/knowledge/*.yaml`), because without a language model its
  answers are retrieved verbatim;
- an LLM turn reads `KnowledgeIndex` (chunks of Markdown, text, PDF and the
  same YAML), whose hits are injected into the prompt with numbered sources
  (`format_hits`) so the model can cite them or say it has no notes on it.

Ranking is BM25F by default (actors/agent/bm25.py): over a dozen to a few
thousand chunks it is instant, deterministic, needs no model files and its
scores separate "about this" from "unrelated" well enough for one
`min_score` threshold. Dense embeddings are pluggable
(actors/agent/embeddings.py) for `embedding` or `hybrid` ranking; a failing
embedder degrades to BM25 instead of failing the turn. Documents and their
chunks: actors/agent/documents.py.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from actors.agent.bm25 import BM25F, ranked, tokenize
from actors.agent.documents import Chunk, KnowledgeEntry, load_entries, load_source
from actors.agent.embeddings import Embedder, EmbeddingError, EmbeddingsConfig, build_embedder

log = logging.getLogger(__name__)

MAX_QUERY_CHARS = 2000
"""Longer queries are cut: a question, not a document."""


# ------------------------------------------------ curated entries (offline engine)
class KnowledgeBase:
    """Curated entries plus a BM25F index, built once at load time; what the
    offline dialogue engine answers from."""

    def __init__(self, entries: list[KnowledgeEntry], name: str = "") -> None:
        self.name = name
        self.entries = entries
        self._index = BM25F([
            {"title": tokenize(e.title), "aliases": tokenize(" ".join(e.aliases)), "text": tokenize(e.text)}
            for e in entries
        ])

    @classmethod
    def load(cls, path: str | Path) -> KnowledgeBase:
        name, entries = load_entries(path)
        return cls(entries, name=name)

    def titles(self) -> list[str]:
        return [e.title for e in self.entries]

    def get(self, entry_id: str) -> KnowledgeEntry | None:
        return next((e for e in self.entries if e.id == entry_id), None)

    def search(self, query: str, k: int = 3) -> list[tuple[KnowledgeEntry, float]]:
        """Best `k` entries with a positive score, best first."""
        terms = tokenize(query[:MAX_QUERY_CHARS])
        if not terms:
            return []
        return [(self.entries[i], round(s, 6)) for i, s in ranked(self._index.scores(terms), k)]


# -------------------------------------------------------------------- config
class KnowledgeConfig(BaseModel):
    """The `knowledge` section: what is loaded, how it is ranked and cut."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("default", pattern=r"^[a-z0-9][a-z0-9_-]{0,39}$")
    """The knowledge base's name; one pool actor per (name, node)."""
    sources: list[str] = ["config/knowledge/museum.yaml"]
    """Files (.yaml .md .txt .pdf) or directories, relative to the project root."""
    store_dir: str | None = "data/knowledge"
    """Where documents ingested over HTTP are kept across restarts (None: memory only)."""
    top_k: int = Field(3, ge=1, le=20)
    min_score: float = Field(3.0, ge=0)
    """BM25 score a hit needs (bm25 and hybrid ranking)."""
    ranking: Literal["bm25", "embedding", "hybrid"] = "bm25"
    min_similarity: float = Field(0.5, ge=-1, le=1)
    """Cosine similarity a hit needs (embedding and hybrid ranking); depends on the model."""
    embeddings: EmbeddingsConfig | None = None
    chunk_chars: int = Field(800, ge=100, le=8000)
    chunk_overlap: int = Field(80, ge=0, le=2000)
    max_document_bytes: int = Field(512 * 1024, ge=1, le=16 * 1024 * 1024)
    max_documents: int = Field(200, ge=1, le=10_000)
    """Ingested documents kept (sources from configuration are not counted)."""
    max_chunks: int = Field(20_000, ge=1, le=200_000)
    context_chars: int = Field(4000, ge=200, le=100_000)
    """Cap on the prompt block `format_hits` makes."""

    @model_validator(mode="after")
    def _consistent(self) -> KnowledgeConfig:
        if self.ranking != "bm25" and self.embeddings is None:
            raise ValueError(f"ranking '{self.ranking}' needs an 'embeddings' section")
        if self.chunk_overlap >= self.chunk_chars:
            raise ValueError("chunk_overlap must be smaller than chunk_chars")
        return self


# --------------------------------------------------------------------- index
@dataclass(frozen=True)
class Hit:
    """One retrieved chunk. `score` is what was ranked by (BM25, cosine, or
    the fused rank score); the parts are kept for diagnosis."""

    id: str
    text: str
    score: float
    source: str
    bm25: float | None = None
    similarity: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _normalise(vectors: Sequence[Sequence[float]]) -> Any:
    import numpy as np

    m = np.asarray(vectors, dtype=np.float32)
    return m / np.maximum(np.linalg.norm(m, axis=-1, keepdims=True), 1e-12)


def _chunk_fields(chunks: Iterable[Chunk]) -> list[dict[str, list[str]]]:
    return [{"title": tokenize(" ".join(c.headings)), "aliases": tokenize(" ".join(c.aliases)),
             "text": tokenize(c.text)} for c in chunks]


_RRF_K = 60
"""Reciprocal-rank fusion constant (Cormack et al.): fuses two rankings
whose scores are on different scales without tuning a weight."""


class KnowledgeIndex:
    """Chunks of many documents, searchable; documents can be replaced or
    removed (ingest) and the BM25 statistics are rebuilt, since idf changes."""

    def __init__(self, chunks: Iterable[Chunk] = (), *, embedder: Embedder | None = None,
                 ranking: Literal["bm25", "embedding", "hybrid"] = "bm25", min_score: float = 3.0,
                 min_similarity: float = 0.5, top_k: int = 3) -> None:
        self.embedder = embedder if ranking != "bm25" else None
        self.ranking = ranking if self.embedder is not None else "bm25"
        self.min_score, self.min_similarity, self.top_k = min_score, min_similarity, top_k
        self.embedding_error: str | None = None
        self._docs: dict[str, list[Chunk]] = {}
        self._fields: dict[str, list[dict[str, list[str]]]] = {}
        """Tokens per document, kept so an ingest re-tokenises only itself."""
        self._vectors: dict[str, Any] = {}
        by_doc: dict[str, list[Chunk]] = {}
        for c in chunks:
            by_doc.setdefault(c.document, []).append(c)
        for document, doc_chunks in by_doc.items():
            self._docs[document] = doc_chunks
            self._fields[document] = _chunk_fields(doc_chunks)
            self._vectors[document] = self.embed_chunks(doc_chunks)
        self._rebuild()

    @classmethod
    def from_config(cls, cfg: KnowledgeConfig, root: Path, extra: Iterable[Chunk] = ()) -> KnowledgeIndex:
        chunks: list[Chunk] = []
        for src in cfg.sources:
            p = Path(src)
            chunks += load_source(p if p.is_absolute() else root / p, max_chars=cfg.chunk_chars,
                                  overlap=cfg.chunk_overlap)
        return cls([*chunks, *extra], embedder=build_embedder(cfg.embeddings), ranking=cfg.ranking,
                   min_score=cfg.min_score, min_similarity=cfg.min_similarity, top_k=cfg.top_k)

    # -- documents -----------------------------------------------------------
    def embed_chunks(self, chunks: Sequence[Chunk]) -> Any:
        """Normalised vectors for `chunks`, or None when there is no embedder
        or it failed (those chunks are then found by BM25 only)."""
        if self.embedder is None or not chunks:
            return None
        try:
            return _normalise(self.embedder.embed_documents([f"{c.source}\n{c.text}" for c in chunks]))
        except Exception as e:  # noqa: BLE001 - retrieval degrades to BM25, it must not fail the load
            self.embedding_error = f"{type(e).__name__}: {e}"
            log.warning("knowledge: embedding %d chunks failed (%s); BM25 only for them", len(chunks), e)
            return None

    def put_document(self, document: str, chunks: list[Chunk], vectors: Any = None) -> bool:
        """Add or replace the chunks kept under key `document` (configured
        sources are keyed by file name; callers may choose their own keys).
        `vectors` come from `embed_chunks`, computed beforehand so an async
        caller can do it off its loop. True when it replaced something."""
        replaced = document in self._docs
        self._docs[document] = list(chunks)
        self._fields[document] = _chunk_fields(chunks)
        self._vectors[document] = vectors
        self._rebuild()
        return replaced

    def remove_document(self, document: str) -> bool:
        if self._docs.pop(document, None) is None:
            return False
        self._vectors.pop(document, None)
        self._fields.pop(document, None)
        self._rebuild()
        return True

    def documents(self) -> dict[str, int]:
        return {d: len(c) for d, c in self._docs.items()}

    def __len__(self) -> int:
        return len(self._chunks)

    def _rebuild(self) -> None:
        self._chunks = [c for cs in self._docs.values() for c in cs]
        self._bm25 = BM25F([f for d in self._docs for f in self._fields[d]])
        self._matrix, self._has_vector = None, []
        if self.embedder is not None:
            import numpy as np

            rows, has = [], []
            for document, cs in self._docs.items():
                v = self._vectors.get(document)
                has += [v is not None] * len(cs)
                rows.append(v)
            dims = {r.shape[1] for r in rows if r is not None}
            if len(dims) == 1:
                d = dims.pop()
                self._matrix = np.vstack([r if r is not None else np.zeros((len(cs), d), np.float32)
                                          for r, cs in zip(rows, self._docs.values())])
                self._has_vector = has

    # -- search ----------------------------------------------------------------
    def search(self, query: str, k: int | None = None, *, query_vector: Sequence[float] | None = None,
               embed: bool = True) -> list[Hit]:
        """Up to `k` hits that pass the threshold, best first; [] means the
        knowledge base has nothing on it. `query_vector` lets an async caller
        embed the query off its event loop; `embed=False` without one ranks
        by BM25 alone (the caller's embedding call failed)."""
        k = self.top_k if k is None else k
        query = query[:MAX_QUERY_CHARS]
        bm25 = self._bm25.scores(tokenize(query))
        sims = self._similarities(query, query_vector) if embed or query_vector is not None else None
        if sims is None:  # BM25 only (configured, or the embedder is down)
            return [self._hit(i, s, bm25=s) for i, s in ranked(bm25, k) if s >= self.min_score]
        if self.ranking == "embedding":
            passed = {i: s for i, s in sims.items() if s >= self.min_similarity}
            return [self._hit(i, s, bm25=bm25.get(i), similarity=s) for i, s in ranked(passed, k)]
        passed_ids = {i for i, s in bm25.items() if s >= self.min_score}
        passed_ids |= {i for i, s in sims.items() if s >= self.min_similarity}
        by_bm25 = {i: r for r, (i, _) in enumerate(ranked(bm25, len(self._chunks)))}
        by_sim = {i: r for r, (i, _) in enumerate(sorted(sims.items(), key=lambda p: (-p[1], p[0])))}
        fused = {i: sum(1 / (_RRF_K + 1 + r[i]) for r in (by_bm25, by_sim) if i in r) for i in passed_ids}
        return [self._hit(i, s, bm25=bm25.get(i), similarity=sims.get(i)) for i, s in ranked(fused, k)]

    def _similarities(self, query: str, query_vector: Sequence[float] | None) -> dict[int, float] | None:
        if self._matrix is None or self.embedder is None:
            return None
        try:
            vec = query_vector if query_vector is not None else self.embedder.embed_query(query)
            q = _normalise([vec])[0]
            if q.shape[0] != self._matrix.shape[1]:
                raise EmbeddingError(f"query vector has {q.shape[0]} dimensions, the index {self._matrix.shape[1]}")
        except Exception as e:  # noqa: BLE001 - degrade to BM25 rather than fail the turn
            log.warning("knowledge: query embedding failed (%s); ranking by BM25", e)
            return None
        sims = self._matrix @ q
        return {i: float(sims[i]) for i, ok in enumerate(self._has_vector) if ok}

    def _hit(self, i: int, score: float, *, bm25: float | None = None, similarity: float | None = None) -> Hit:
        c = self._chunks[i]
        return Hit(id=c.id, text=c.text, score=round(score, 6), source=c.source,
                   bm25=None if bm25 is None else round(bm25, 6),
                   similarity=None if similarity is None else round(similarity, 6))

    def stats(self) -> dict[str, Any]:
        return {"documents": len(self._docs), "chunks": len(self._chunks), "ranking": self.ranking,
                "embeddings": type(self.embedder).__name__ if self.embedder else None,
                "embedded_chunks": sum(self._has_vector), "embedding_error": self.embedding_error}


# ------------------------------------------------------------------ prompting
NOTHING_FOUND = (
    "Knowledge base: nothing relevant was found for this question. If answering needs facts from the "
    "notes, say plainly that you don't have that in your notes; do not guess."
)


def format_hits(hits: Sequence[Hit], *, max_chars: int = 4000) -> str:
    """The block injected into an LLM prompt: numbered sources the model can
    cite as [n], or a plain statement that nothing passed the threshold (so
    the model says so instead of inventing an answer). Capped at `max_chars`
    so a long chunk cannot crowd the conversation out of the context."""
    if not hits:
        return NOTHING_FOUND
    head = "Knowledge base excerpts. Answer from them when they are relevant and cite them as [n]; " \
           "if they do not answer the question, say you don't have that in your notes."
    parts, used = [head], len(head)
    for n, hit in enumerate(hits, 1):
        block = f"[{n}] {hit.source}\n{' '.join(hit.text.split())}"
        room = max_chars - used - 2
        if room <= len(f"[{n}] {hit.source}") + 20:
            break
        parts.append(block if len(block) <= room else block[:room - 1] + "…")
        used += len(parts[-1]) + 2
    return "\n\n".join(parts)
