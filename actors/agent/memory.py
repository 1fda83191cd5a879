"""Long-term memory per user: facts that outlive a session and a restart.

A memory belongs to one principal (`user:alice`, `device:aa:bb:...`), never
to a session, and is never visible to another principal. It lives in a real
database (SQLite by default, PostgreSQL when configured) through
`actors.agent.db`, so every replica and every session actor sees the same
memories.

Policy, decided here once:
- Saved on request ("remember that …", source `user`) or by policy (facts the
  user states about themselves, source `policy`; `memory_policy.extract_memories`).
- De-duplicated: a restated fact (same text once case, punctuation and spacing
  are folded, or token sets overlapping ≥ `dedup_overlap`) updates the existing
  memory (new wording, new time) instead of adding one.
- Capped: at `max_per_user`, a new memory evicts the least recently updated
  *unpinned* one. What the user asked for explicitly is pinned and never
  evicted silently; when every memory is pinned the store refuses with
  `memory.limit` and the user has to delete some first.
- Recalled by relevance: BM25 over `actors.agent.bm25.tokenize` (words for
  English, character bigrams for Chinese) across the owner's memories only;
  ties go to the more recent.
- Anonymous principals (auth disabled) have no long-term memory unless
  `allow_anonymous`: every unauthenticated caller would share it.
"""

from __future__ import annotations

import builtins
import os
import re
import secrets
import time
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from actors.agent.bm25 import BM25F, tokenize
from actors.agent.db import Database, Tx
from actors.agent.memory_policy import Source, extract_memories, normalize, overlap

PROJECT_ROOT = Path(__file__).resolve().parents[2]
"""Same as `actors.config.PROJECT_ROOT`, not imported from there, so that
`actors/config.py` can import `MemoryConfig` for its `memory:` section."""

EXPORT_FORMAT = "voice-actors.memories/1"

MAX_OWNER_CHARS = 200
MAX_QUERY_CHARS = 2000
"""A recall query longer than this is cut: the start of an utterance says what it is about."""
MAX_QUERY_TERMS = 64
MAX_RECALL_K = 50
_MEMORY_ID = re.compile(r"[0-9a-f]{24}")
_OWNER = re.compile(r"(user|device|anonymous):[^\x00-\x1f\x7f]+")
_URL_ENV = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


class MemoryConfig(BaseModel):
    """The `memory:` section of the server's configuration."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    url: str = "sqlite:///data/memory.sqlite3"
    """`sqlite:///relative/path` (relative to the project root, not the cwd),
    `sqlite:////absolute/path`, or `postgresql://user@host:5432/db`. Put a
    password in the variable named by `url_env`, not here."""
    url_env: str | None = Field(None, pattern=f"^{_URL_ENV.pattern}$")
    """Name of an environment variable that, when set and non-empty, replaces
    `url` (a PostgreSQL DSN with its password). Its value is never logged."""
    max_per_user: int = Field(500, ge=1, le=100_000)
    """Memories one principal may hold; see the module docstring for eviction."""
    max_chars: int = Field(500, ge=16, le=10_000)
    """Longest memory, in characters after whitespace is folded."""
    recall_k: int = Field(3, ge=1, le=MAX_RECALL_K)
    """Memories put into a prompt per turn."""
    min_score: float = Field(0.0, ge=0.0)
    """Recall returns only memories scoring above zero and at least this (BM25)."""
    dedup_overlap: float = Field(0.8, gt=0.0, le=1.0)
    """Token-set overlap (Jaccard) at or above which a new memory restates an old one."""
    allow_anonymous: bool = False
    """Give anonymous principals memory too (local demos with auth off): they all share it."""

    def resolved_url(self, env: Mapping[str, str] | None = None) -> str:
        """`url`, or the value of `url_env` when that variable is set."""
        env = os.environ if env is None else env
        if self.url_env and env.get(self.url_env):
            return env[self.url_env]
        return self.url


# --------------------------------------------------------------------------- errors

_ERRORS: dict[str, tuple[int, str]] = {
    "memory.not_found": (404, "no such memory"),
    "memory.empty": (400, "a memory needs some text"),
    "memory.too_long": (413, "that memory is too long"),
    "memory.limit": (409, "memory is full: delete some memories first"),
    "memory.bad_owner": (403, "long-term memory needs a signed-in user or a device"),
    "memory.bad_request": (400, "invalid memory request"),
    "memory.disabled": (404, "long-term memory is not enabled on this server"),
    "memory.unavailable": (503, "memory is unavailable right now, try again later"),
}


class MemoryStoreError(Exception):
    """A memory request that cannot be done; `code` is stable, `message` safe to show.

    Carries its HTTP status so the ingress maps every failure the same way.
    """

    def __init__(self, code: str, message: str | None = None) -> None:
        status, default = _ERRORS.get(code, (400, "invalid memory request"))
        self.code = code
        self.message = message or default
        self.http_status = status
        super().__init__(self.message)

    def __reduce__(self) -> tuple[Any, ...]:
        # Keeps the code when the error crosses a process boundary (Ray pickles it).
        return (type(self), (self.code, self.message))

    def to_dict(self) -> dict[str, Any]:
        return {"error": self.code, "message": self.message}


# --------------------------------------------------------------------------- values


@dataclass(frozen=True)
class Memory:
    id: str
    owner: str
    text: str
    source: Source
    pinned: bool
    created: float
    updated: float
    score: float | None = None
    """BM25 relevance, set only on what `recall` returns."""

    def to_dict(self) -> dict[str, Any]:
        """The API's view: JSON-serialisable, without the owner (the caller is the owner)."""
        data = asdict(self)
        del data["owner"]
        if self.score is None:
            del data["score"]
        return data


def _memory(row: Mapping[str, Any], score: float | None = None) -> Memory:
    return Memory(id=row["id"], owner=row["owner"], text=row["text"], source=row["source"],
                  pinned=bool(row["pinned"]), created=float(row["created"]), updated=float(row["updated"]),
                  score=score)


# --------------------------------------------------------------------------- store

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS memory_owners (
        owner   TEXT PRIMARY KEY,
        touched DOUBLE PRECISION NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS memories (
        id      TEXT PRIMARY KEY,
        owner   TEXT NOT NULL,
        text    TEXT NOT NULL,
        norm    TEXT NOT NULL,
        source  TEXT NOT NULL,
        pinned  INTEGER NOT NULL,
        created DOUBLE PRECISION NOT NULL,
        updated DOUBLE PRECISION NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS memories_owner_updated ON memories (owner, updated)",
)
_COLUMNS = "id, owner, text, source, pinned, created, updated"


class MemoryStore:
    """Memories of every principal in one database; each call touches one owner's only.

    Open it once per process (`await store.open()` or `async with`); it is
    safe to share between sessions in that process. Every method checks its
    inputs as if they came from the network, because they may.
    """

    def __init__(self, config: MemoryConfig | None = None, *, env: Mapping[str, str] | None = None,
                 root: Path = PROJECT_ROOT, clock: Callable[[], float] = time.time) -> None:
        self.config = config or MemoryConfig()
        self._db = Database(self.config.resolved_url(env), root=root)
        self._clock = clock
        self._opened = False

    def __repr__(self) -> str:
        return f"MemoryStore({self._db.display_url!r})"

    @property
    def database(self) -> Database:
        return self._db

    async def open(self) -> MemoryStore:
        """Create the tables if missing; idempotent, and cheap after the first call."""
        if not self._opened:
            await self._db.create_schema(_SCHEMA)
            self._opened = True
        return self

    async def close(self) -> None:
        await self._db.close()
        self._opened = False

    async def __aenter__(self) -> MemoryStore:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def check(self) -> None:
        """Raise unless the database answers (for /health)."""
        await self.open()
        await self._db.fetchone("SELECT 1 AS ok")

    # ---- writing

    async def remember(self, owner: str, text: str, source: Source = "user") -> Memory:
        """Keep `text` for `owner`; → the memory as stored (an older one when this restates it).

        Raises MemoryStoreError `memory.empty`, `memory.too_long`,
        `memory.limit` (full of pinned memories) or `memory.bad_owner`.
        """
        owner = self._check_owner(owner)
        text = self._check_text(text)
        if source not in ("user", "policy"):
            raise MemoryStoreError("memory.bad_request", "source must be 'user' or 'policy'")
        await self.open()
        norm, tokens = normalize(text), set(tokenize(text))
        pinned = source == "user"
        now = self._clock()
        async with self._db.transaction() as tx:
            await self._lock_owner(tx, owner, now)
            rows = await tx.fetch(f"SELECT {_COLUMNS}, norm FROM memories WHERE owner = ?", owner)
            same = self._restated(rows, norm, tokens)
            if same is not None:
                keep_pin = bool(same["pinned"]) or pinned
                await tx.execute("UPDATE memories SET text = ?, norm = ?, source = ?, pinned = ?, updated = ? "
                                 "WHERE id = ? AND owner = ?",
                                 text, norm, "user" if keep_pin else "policy", int(keep_pin), now, same["id"], owner)
                return Memory(id=same["id"], owner=owner, text=text, source="user" if keep_pin else "policy",
                              pinned=keep_pin, created=float(same["created"]), updated=now)
            if len(rows) >= self.config.max_per_user:
                await self._evict(tx, owner, rows, len(rows) - self.config.max_per_user + 1)
            memory = Memory(id=secrets.token_hex(12), owner=owner, text=text, source=source, pinned=pinned,
                            created=now, updated=now)
            await tx.execute("INSERT INTO memories (id, owner, text, norm, source, pinned, created, updated) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                             memory.id, owner, text, norm, source, int(pinned), now, now)
            return memory

    async def remember_from(self, owner: str, user_text: str,
                            policy: Literal["off", "explicit", "auto"] = "explicit") -> builtins.list[Memory]:
        """Save what `extract_memories` finds in one utterance.

        An explicit request that cannot be kept raises (the assistant should
        say so); a policy fact that cannot be kept is skipped silently.
        """
        saved = []
        for candidate in extract_memories(user_text, policy, self.config.max_chars):
            try:
                saved.append(await self.remember(owner, candidate.text, candidate.source))
            except MemoryStoreError as e:
                if candidate.source == "user" or e.code == "memory.bad_owner":
                    raise
        return saved

    async def delete(self, owner: str, memory_id: str) -> None:
        """Forget one memory; someone else's id, or a malformed one, is `memory.not_found`."""
        owner = self._check_owner(owner)
        if not isinstance(memory_id, str) or not _MEMORY_ID.fullmatch(memory_id):
            raise MemoryStoreError("memory.not_found")
        await self.open()
        async with self._db.transaction() as tx:
            await self._lock_owner(tx, owner, self._clock())
            deleted = await tx.execute("DELETE FROM memories WHERE owner = ? AND id = ?", owner, memory_id)
        if deleted == 0:
            raise MemoryStoreError("memory.not_found")

    async def delete_all(self, owner: str) -> int:
        """Forget everything `owner` has; → how many memories went."""
        owner = self._check_owner(owner)
        await self.open()
        async with self._db.transaction() as tx:
            await self._lock_owner(tx, owner, self._clock())
            count = await tx.execute("DELETE FROM memories WHERE owner = ?", owner)
            await tx.execute("DELETE FROM memory_owners WHERE owner = ?", owner)
        return count

    # ---- reading

    async def recall(self, owner: str, query: str, k: int | None = None) -> builtins.list[Memory]:
        """The `k` memories most relevant to `query` (BM25 over the owner's
        memories), best first, ties to the most recent; only scores above zero
        and at least `min_score`. Each carries its `score`."""
        owner = self._check_owner(owner)
        k = self.config.recall_k if k is None else k
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_RECALL_K:
            raise MemoryStoreError("memory.bad_request", f"k must be 1-{MAX_RECALL_K}")
        if not isinstance(query, str):
            raise MemoryStoreError("memory.bad_request", "query must be text")
        terms = list(dict.fromkeys(tokenize(query[:MAX_QUERY_CHARS])))[:MAX_QUERY_TERMS]
        if not terms:
            return []
        rows = await self._rows(owner)
        index = BM25F([{"text": tokenize(row["text"])} for row in rows], min_corpus=1)
        scored = [(score, rows[i]) for i, score in index.scores(terms).items()
                  if score > 0 and score >= self.config.min_score]
        scored.sort(key=lambda s: (-round(s[0], 9), -float(s[1]["updated"]), -float(s[1]["created"]), s[1]["id"]))
        return [_memory(row, round(score, 6)) for score, row in scored[:k]]

    async def get(self, owner: str, memory_id: str) -> Memory:
        owner = self._check_owner(owner)
        if not isinstance(memory_id, str) or not _MEMORY_ID.fullmatch(memory_id):
            raise MemoryStoreError("memory.not_found")
        await self.open()
        row = await self._db.fetchone(f"SELECT {_COLUMNS} FROM memories WHERE owner = ? AND id = ?",
                                      owner, memory_id)
        if row is None:
            raise MemoryStoreError("memory.not_found")
        return _memory(row)

    async def count(self, owner: str) -> int:
        owner = self._check_owner(owner)
        await self.open()
        row = await self._db.fetchone("SELECT COUNT(*) AS n FROM memories WHERE owner = ?", owner)
        return int(row["n"]) if row else 0

    async def list(self, owner: str, limit: int | None = None, offset: int = 0) -> builtins.list[Memory]:
        """The owner's memories, newest first (`limit`/`offset` page through them)."""
        owner = self._check_owner(owner)
        for name, value in (("limit", limit if limit is not None else 0), ("offset", offset)):
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 1_000_000:
                raise MemoryStoreError("memory.bad_request", f"{name} must be a whole number 0-1000000")
        rows = await self._rows(owner)
        rows.sort(key=lambda r: (-float(r["updated"]), -float(r["created"]), r["id"]))
        end = None if limit is None else offset + limit
        return [_memory(r) for r in rows[offset:end]]

    async def export(self, owner: str) -> dict[str, Any]:
        """Everything stored for `owner`, JSON-serialisable (GDPR-style export)."""
        memories = await self.list(owner)
        return {"format": EXPORT_FORMAT, "owner": owner, "exported_at": self._clock(),
                "count": len(memories), "memories": [m.to_dict() for m in memories]}

    # ---- internals

    async def _rows(self, owner: str) -> builtins.list[dict[str, Any]]:
        await self.open()
        # Bounded by max_per_user, so reading them all is cheaper than a second query shape per driver.
        return await self._db.fetch(f"SELECT {_COLUMNS} FROM memories WHERE owner = ?", owner)

    @staticmethod
    async def _lock_owner(tx: Tx, owner: str, now: float) -> None:
        """Serialise writers of one owner: the upsert row-locks `memory_owners`
        on PostgreSQL until commit (SQLite's BEGIN IMMEDIATE already serialises
        all writers), so two replicas cannot both pass the dedup and cap checks.
        Every write takes it first, so writers of one owner never deadlock."""
        await tx.execute("INSERT INTO memory_owners (owner, touched) VALUES (?, ?) "
                         "ON CONFLICT (owner) DO UPDATE SET touched = excluded.touched", owner, now)

    def _restated(self, rows: builtins.list[dict[str, Any]], norm: str, tokens: set[str]) -> dict[str, Any] | None:
        best, best_overlap = None, 0.0
        for row in rows:
            if row["norm"] == norm:
                return row
            score = overlap(tokens, set(tokenize(row["text"])))
            if score >= self.config.dedup_overlap and score > best_overlap:
                best, best_overlap = row, score
        return best

    async def _evict(self, tx: Tx, owner: str, rows: builtins.list[dict[str, Any]], n: int) -> None:
        unpinned = sorted((r for r in rows if not r["pinned"]), key=lambda r: (float(r["updated"]), r["id"]))
        if len(unpinned) < n:
            raise MemoryStoreError(
                "memory.limit", f"memory is full ({self.config.max_per_user} kept on request): "
                                "delete some memories first")
        for row in unpinned[:n]:
            await tx.execute("DELETE FROM memories WHERE owner = ? AND id = ?", owner, row["id"])

    def _check_owner(self, owner: str) -> str:
        if not isinstance(owner, str) or len(owner) > MAX_OWNER_CHARS or not _OWNER.fullmatch(owner):
            raise MemoryStoreError("memory.bad_owner", "invalid memory owner")
        if owner.startswith("anonymous:") and not self.config.allow_anonymous:
            raise MemoryStoreError("memory.bad_owner")
        return owner

    def _check_text(self, text: str) -> str:
        if not isinstance(text, str):
            raise MemoryStoreError("memory.bad_request", "a memory must be text")
        limit = self.config.max_chars
        if len(text) > 4 * limit + 1024:  # refuse before folding megabytes
            raise MemoryStoreError("memory.too_long", f"a memory may have at most {limit} characters")
        cleaned = " ".join("".join(" " if unicodedata.category(c) == "Cc" else c for c in text).split())
        if not cleaned:
            raise MemoryStoreError("memory.empty")
        if len(cleaned) > limit:
            raise MemoryStoreError("memory.too_long", f"a memory may have at most {limit} characters")
        return cleaned
