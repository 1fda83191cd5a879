"""The knowledge base as a pool actor: loaded once per node, shared by all.

One named, detached Ray actor per (knowledge base, node),
`pool:knowledge:{name}:{node_id}`, made on first use and pinned to its node
as the provider pools are (actors/pools.py `pinned_to`, DESIGN §3):
sessions and ingress replicas ask the pool on their own node, so a search
never crosses nodes and the index (and any embedding vectors) lives once per
node, not once per session.

Documents ingested over HTTP are written to `store_dir` (one file plus a
small JSON record each) before they are indexed, so a restarted pool, or a
new one on a node sharing that directory, loads them again. Configured
`sources` are read-only and never written.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import ray

from actors.agent.documents import Chunk, chunk_text
from actors.agent.knowledge import MAX_QUERY_CHARS, Hit, KnowledgeConfig, KnowledgeIndex
from actors.pools import pinned_to

log = logging.getLogger(__name__)

DOCUMENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
"""Ingested document names: also their file names, so no separators, no
leading dot, nothing a path could be built from."""
_MAX_RECORD_BYTES = 64 * 1024
_MAX_SOURCE_LABEL = 200


class KnowledgeLimitError(ValueError):
    """The knowledge base is full (documents or chunks): a 409, not a 400."""


def knowledge_pool_name(name: str, node_id: str) -> str:
    """`pool:knowledge:{name}:{node_id}`, the node id last as in pools.pool_name."""
    return f"pool:knowledge:{name}:{node_id}"


def is_markdown(name: str) -> bool:
    return not name.lower().endswith(".txt")


class DocumentStore:
    """Ingested documents on disk: `docs/<name>` holds the text,
    `meta/<name>.json` how to cite it. Writes go through a temporary file and
    a rename, so a crash leaves the old version or the new, never half."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        (root / "docs").mkdir(parents=True, exist_ok=True)
        (root / "meta").mkdir(parents=True, exist_ok=True)

    @staticmethod
    def check_name(name: str) -> str:
        if not DOCUMENT_NAME.match(name) or ".." in name:
            raise ValueError("document name must be 1-100 of A-Z a-z 0-9 . _ - and not start with a dot")
        return name

    def put(self, name: str, text: str, source: str) -> None:
        self.check_name(name)
        data = text.encode("utf-8")
        if len(data) > self.max_bytes:
            raise ValueError(f"document is over the {self.max_bytes}-byte limit")
        record = {"name": name, "source": source, "bytes": len(data), "ingested_at": time.time()}
        self._write(self.root / "docs" / name, data)
        self._write(self.root / "meta" / f"{name}.json", json.dumps(record, ensure_ascii=False).encode())

    def delete(self, name: str) -> bool:
        self.check_name(name)
        found = False
        for p in (self.root / "meta" / f"{name}.json", self.root / "docs" / name):
            try:
                p.unlink()
                found = True
            except FileNotFoundError:
                pass
        return found

    def load(self, limit: int) -> list[tuple[str, str, str]]:
        """(name, text, source) of every readable document, by name, at most
        `limit`; a damaged one is skipped with a warning, not fatal."""
        out: list[tuple[str, str, str]] = []
        for meta in sorted((self.root / "meta").glob("*.json")):
            name = meta.name[:-len(".json")]
            try:
                self.check_name(name)
                if meta.stat().st_size > _MAX_RECORD_BYTES:
                    raise ValueError("record too large")
                record = json.loads(meta.read_text(encoding="utf-8"))
                doc = self.root / "docs" / name
                if doc.stat().st_size > self.max_bytes:
                    raise ValueError("document too large")
                out.append((name, doc.read_text(encoding="utf-8"), str(record.get("source") or name)))
            except (OSError, ValueError) as e:
                log.warning("knowledge store: skipping %s (%s)", name, e)
            if len(out) >= limit:
                log.warning("knowledge store: more than %d documents; the rest are not loaded", limit)
                break
        return out

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)


def document_chunks(cfg: KnowledgeConfig, name: str, text: str, source: str) -> list[Chunk]:
    """Chunks of an ingested document, cited by `source` (default its name)."""
    chunks = chunk_text(text, name, markdown=is_markdown(name), max_chars=cfg.chunk_chars, overlap=cfg.chunk_overlap)
    if source == name:
        return chunks
    return [Chunk(id=c.id, document=source, headings=c.headings, text=c.text, aliases=c.aliases) for c in chunks]


@ray.remote(max_restarts=-1)
class KnowledgePool:
    """Holds one loaded `KnowledgeIndex` and serves searches and ingests.
    Ingests are serialised (one lock); searches run between them and always
    see a whole index, since the swap happens without an await."""

    def __init__(self, cfg: KnowledgeConfig, root: str) -> None:
        started = time.perf_counter()
        self._cfg = cfg
        self._root = Path(root)
        store_dir = Path(cfg.store_dir) if cfg.store_dir else None
        self._store = DocumentStore(store_dir if store_dir is None or store_dir.is_absolute()
                                    else self._root / store_dir, cfg.max_document_bytes) if store_dir else None
        self._index = KnowledgeIndex.from_config(cfg, self._root)
        self._ingested: dict[str, str] = {}  # document name → how it is cited
        for name, text, source in self._store.load(cfg.max_documents) if self._store else []:
            try:
                self._put(name, text, source, self._index.embed_chunks(document_chunks(cfg, name, text, source)))
            except ValueError as e:
                log.warning("knowledge store: %s not indexed (%s)", name, e)
        self._lock = asyncio.Lock()
        self._load_s = time.perf_counter() - started
        self._searches = 0
        self._ingests = 0

    def _put(self, name: str, text: str, source: str, vectors: Any) -> tuple[bool, int]:
        """Index document `name` under its own key, so neither a configured
        source nor another document cited by the same label is replaced."""
        chunks = document_chunks(self._cfg, name, text, source)
        replaced = self._index.put_document(_key(name), chunks, vectors)
        self._ingested[name] = source
        return replaced, len(chunks)

    async def search(self, query: str, k: int | None = None) -> list[Hit]:
        """Hits for `query`; the query is embedded in a thread (a blocking
        HTTP call or a model run) and BM25 answers alone if that fails."""
        self._searches += 1
        vector = None
        if self._index.embedder is not None:
            try:
                vector = await asyncio.to_thread(self._index.embedder.embed_query, query[:MAX_QUERY_CHARS])
            except Exception as e:  # noqa: BLE001 - BM25 still answers
                log.warning("knowledge: query embedding failed (%s); ranking by BM25", e)
        return self._index.search(query, k, query_vector=vector, embed=False)

    async def ingest(self, name: str, text: str, source: str | None = None) -> dict[str, Any]:
        """Add or replace document `name`; ValueError for bad input (name,
        size, too many documents or chunks), nothing stored then."""
        DocumentStore.check_name(name)
        source = " ".join((source or name).split())[:_MAX_SOURCE_LABEL] or name
        if len(text.encode("utf-8")) > self._cfg.max_document_bytes:
            raise ValueError(f"document is over the {self._cfg.max_document_bytes}-byte limit")
        async with self._lock:
            if name not in self._ingested and len(self._ingested) >= self._cfg.max_documents:
                raise KnowledgeLimitError(f"the knowledge base holds {self._cfg.max_documents} documents already")
            chunks = document_chunks(self._cfg, name, text, source)
            if not chunks:
                raise ValueError("document has no text")
            previous = self._index.documents().get(_key(name), 0)
            if len(self._index) - previous + len(chunks) > self._cfg.max_chunks:
                raise KnowledgeLimitError(f"the knowledge base would exceed {self._cfg.max_chunks} chunks")
            vectors = await asyncio.to_thread(self._index.embed_chunks, chunks)
            if self._store is not None:
                self._store.put(name, text, source)
            replaced, count = self._put(name, text, source, vectors)
            self._ingests += 1
        return {"name": name, "source": source, "chunks": count, "replaced": replaced,
                "persisted": self._store is not None, **self._totals()}

    async def remove(self, name: str) -> bool:
        async with self._lock:
            self._ingested.pop(name, None)
            if self._store is not None:
                self._store.delete(name)
            return self._index.remove_document(_key(name))

    def _totals(self) -> dict[str, int]:
        return {"documents": len(self._index.documents()), "total_chunks": len(self._index)}

    def stats(self) -> dict[str, Any]:
        return {"name": self._cfg.name, "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
                "load_s": round(self._load_s, 3), "searches": self._searches, "ingests": self._ingests,
                "ingested": sorted(self._ingested), **self._index.stats()}


def _key(name: str) -> str:
    return f"ingested:{name}"


def get_knowledge_pool(cfg: KnowledgeConfig, namespace: str, node_id: str | None = None,
                       root: str | Path | None = None) -> ray.actor.ActorHandle:
    """The pool for knowledge base `cfg.name` on `node_id` (default: the
    caller's), created on first use by whoever asks. `root` resolves relative
    paths in `cfg` (default: the project root)."""
    if root is None:
        from actors.config import PROJECT_ROOT

        root = PROJECT_ROOT
    node_id = node_id or ray.get_runtime_context().get_node_id()
    return KnowledgePool.options(
        name=knowledge_pool_name(cfg.name, node_id), namespace=namespace, lifetime="detached",
        get_if_exists=True, num_cpus=0, max_concurrency=100,
        enable_task_events=False,  # a query every turn: no GCS record of each (actors/runtime.py)
        scheduling_strategy=pinned_to(node_id, num_cpus=0),
    ).remote(cfg, str(root))


def knowledge_pool_handles(name: str, namespace: str) -> dict[str, ray.actor.ActorHandle]:
    """Every existing pool of knowledge base `name`, by node id (creates nothing)."""
    prefix = knowledge_pool_name(name, "")
    found: dict[str, ray.actor.ActorHandle] = {}
    for actor in ray.util.list_named_actors(all_namespaces=True):
        node_id = actor["name"][len(prefix):]
        if actor["namespace"] != namespace or not actor["name"].startswith(prefix) or not node_id or ":" in node_id:
            continue
        try:
            found[node_id] = ray.get_actor(actor["name"], namespace=namespace)
        except ValueError:  # gone between listing and lookup
            pass
    return found
