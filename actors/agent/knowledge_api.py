"""What the knowledge HTTP routes call: validate, reach the pool, plain dicts.

The routes (serve_app.py) stay thin: they pass the raw body, the query
parameters and the `knowledge` config section here, map `KnowledgeAPIError`
to the usual `{"error": {"code", "message"}}` envelope with its status, and
check that the caller is an admin before `ingest` / `remove` (this module
does not know who is calling). Everything is validated before any actor is
asked, so bad input costs no cross-process call.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import ray

from actors.agent.knowledge import MAX_QUERY_CHARS, KnowledgeConfig, format_hits
from actors.agent.knowledge_pool import (
    DocumentStore,
    KnowledgeLimitError,
    get_knowledge_pool,
    knowledge_pool_handles,
)

log = logging.getLogger(__name__)

ACCEPTED_TYPES = frozenset({"text/markdown", "text/x-markdown", "text/plain"})
MAX_SOURCE_LABEL = 200


class KnowledgeAPIError(Exception):
    """Bad input or an unavailable knowledge base: an HTTP status and a
    stable code (`knowledge.*`) clients can branch on."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


# ------------------------------------------------------------------ checks
def parse_document(cfg: KnowledgeConfig, name: str, body: bytes, content_type: str | None = None) -> str:
    """The document's text, or KnowledgeAPIError: name usable as a file
    name, a text media type, within `max_document_bytes`, UTF-8, not binary,
    not empty. `.txt` names are chunked as plain text, others as Markdown."""
    try:
        DocumentStore.check_name(name)
    except ValueError as e:
        raise KnowledgeAPIError(400, "knowledge.bad_name", str(e)) from None
    media = (content_type or "text/markdown").split(";")[0].strip().lower()
    if media not in ACCEPTED_TYPES:
        raise KnowledgeAPIError(415, "knowledge.unsupported_type",
                                f"send text/markdown or text/plain, not {media[:60]}")
    if len(body) > cfg.max_document_bytes:
        raise KnowledgeAPIError(413, "knowledge.too_large",
                                f"document is {len(body)} bytes; the limit is {cfg.max_document_bytes}")
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise KnowledgeAPIError(400, "knowledge.bad_encoding", "document must be UTF-8 text") from None
    if "\x00" in text:
        raise KnowledgeAPIError(400, "knowledge.bad_encoding", "document looks binary (NUL bytes)")
    if not text.strip():
        raise KnowledgeAPIError(400, "knowledge.empty", "document has no text")
    return text


def parse_query(cfg: KnowledgeConfig, query: Any, k: Any = None) -> tuple[str, int]:
    """(query, k), or KnowledgeAPIError: a non-empty string of at most
    MAX_QUERY_CHARS, and 1 <= k <= 20 (default `top_k`)."""
    if not isinstance(query, str) or not query.strip():
        raise KnowledgeAPIError(400, "knowledge.bad_query", "query must be non-empty text")
    if len(query) > MAX_QUERY_CHARS:
        raise KnowledgeAPIError(400, "knowledge.bad_query", f"query is over {MAX_QUERY_CHARS} characters")
    if k is None:
        return query.strip(), cfg.top_k
    try:
        k_int = int(k)
    except (TypeError, ValueError):
        raise KnowledgeAPIError(400, "knowledge.bad_k", "k must be an integer") from None
    if isinstance(k, bool) or not 1 <= k_int <= 20 or (isinstance(k, float) and k != k_int):
        raise KnowledgeAPIError(400, "knowledge.bad_k", "k must be between 1 and 20")
    return query.strip(), k_int


# ---------------------------------------------------------------- handlers
def _pool(cfg: KnowledgeConfig, namespace: str, pool: Any) -> Any:
    if pool is not None:
        return pool
    try:
        return get_knowledge_pool(cfg, namespace)
    except Exception as e:  # noqa: BLE001 - Ray refused to make or find it
        raise KnowledgeAPIError(503, "knowledge.unavailable", f"knowledge base unavailable: {type(e).__name__}") from e


def _message(e: Exception) -> str:
    """The actor's own message, without Ray's traceback around it."""
    return str(getattr(e, "cause", None) or e)[:300]


def _other_pools(cfg: KnowledgeConfig, namespace: str) -> list[Any]:
    """The pools of this knowledge base on other nodes than the caller's."""
    here = ray.get_runtime_context().get_node_id()
    return [h for node, h in knowledge_pool_handles(cfg.name, namespace).items() if node != here]


async def _call(ref: Any) -> Any:
    try:
        return await ref
    except KnowledgeLimitError as e:  # Ray re-raises an actor's error as a subclass of its type
        raise KnowledgeAPIError(409, "knowledge.full", _message(e)) from None
    except ValueError as e:  # the pool rejected the document
        raise KnowledgeAPIError(400, "knowledge.rejected", _message(e)) from None
    except ray.exceptions.RayError as e:
        raise KnowledgeAPIError(503, "knowledge.unavailable", f"knowledge base unavailable: {type(e).__name__}") from e


async def ingest(cfg: KnowledgeConfig, namespace: str, name: str, body: bytes, content_type: str | None = None,
                 source: str | None = None, *, pool: Any = None) -> dict[str, Any]:
    """Store and index document `name` (replacing one of that name) on this
    node's pool, then on every other node's pool (best effort: a node whose
    pool is down loads it from `store_dir` only if that directory is shared).
    Admin-only: the route checks that. → the pool's summary plus `nodes`."""
    text = parse_document(cfg, name, body, content_type)
    label = " ".join((source or "").split())[:MAX_SOURCE_LABEL] or None
    local = _pool(cfg, namespace, pool)
    result = await _call(local.ingest.remote(name, text, label))
    others = _other_pools(cfg, namespace) if pool is None else []
    outcomes = await asyncio.gather(*(h.ingest.remote(name, text, label) for h in others), return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            log.warning("knowledge: ingest of %s on another node failed: %s", name, outcome)
    result["nodes"] = 1 + sum(not isinstance(o, BaseException) for o in outcomes)
    return result


async def search(cfg: KnowledgeConfig, namespace: str, query: Any, k: Any = None, *,
                 pool: Any = None) -> dict[str, Any]:
    """→ `{"query", "k", "found", "hits": [{id, text, score, source, bm25,
    similarity}], "context"}`, where `context` is the block an LLM prompt
    would get (numbered sources, or the "nothing found" notice)."""
    q, k_int = parse_query(cfg, query, k)
    hits = await _call(_pool(cfg, namespace, pool).search.remote(q, k_int))
    return {"query": q, "k": k_int, "found": bool(hits), "hits": [h.to_dict() for h in hits],
            "context": format_hits(hits, max_chars=cfg.context_chars)}


async def remove(cfg: KnowledgeConfig, namespace: str, name: str, *, pool: Any = None) -> dict[str, Any]:
    """Forget ingested document `name` on every node. Admin-only."""
    try:
        DocumentStore.check_name(name)
    except ValueError as e:
        raise KnowledgeAPIError(400, "knowledge.bad_name", str(e)) from None
    local = _pool(cfg, namespace, pool)
    others = _other_pools(cfg, namespace) if pool is None else []
    removed = await _call(local.remove.remote(name))
    await asyncio.gather(*(h.remove.remote(name) for h in others), return_exceptions=True)
    if not removed:
        raise KnowledgeAPIError(404, "knowledge.not_found", f"no ingested document named {name}")
    return {"name": name, "removed": True}


async def stats(cfg: KnowledgeConfig, namespace: str, *, pool: Any = None) -> dict[str, Any]:
    return await _call(_pool(cfg, namespace, pool).stats.remote())
