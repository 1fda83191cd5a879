"""The session store: conversation history, remembered facts, the session's
owner and persona, and each device's session, outside every actor
(DESIGN §6), so a session actor that crashed, was reaped or was restarted
resumes without losing a turn, only for the principal that owns it, and a
device gets its own session back after the directory actor or the whole
server restarted.

One schema on both databases of `actors.agent.db`: SQLite by default (a file
on one node), PostgreSQL (`session.history_db` = `postgresql://…`) when every
node must reach it. One row per session holds its owner and its messages and
memory as JSON, written after each turn; one row per alias (a device id)
names its session.

Ownership and aliases are decided by one conditional statement each
(`INSERT … ON CONFLICT`), so two replicas racing for the same session id or
the same device cannot both win, on either database.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from actors.agent.db import Database, Tx
from actors.config import PROJECT_ROOT, AppConfig
from actors.providers.base import ChatMessage

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS history (
        session_id TEXT PRIMARY KEY,
        messages   TEXT NOT NULL,
        memory     TEXT NOT NULL DEFAULT '{}',
        updated    DOUBLE PRECISION NOT NULL,
        owner      TEXT,
        persona    TEXT,
        summary    TEXT NOT NULL DEFAULT '')""",
    """CREATE TABLE IF NOT EXISTS session_aliases (
        alias      TEXT PRIMARY KEY,
        session_id TEXT NOT NULL,
        created    DOUBLE PRECISION NOT NULL)""",
)

MIGRATIONS: tuple[tuple[str, str, str], ...] = (
    ("history", "owner", "TEXT"),
    ("history", "persona", "TEXT"),
    ("history", "summary", "TEXT NOT NULL DEFAULT ''"),
)
"""(table, column, declaration): columns added since the first version, added
to a database made by an older one (existing rows keep their data)."""

_MIGRATION_LOCK_KEY = 0x7661_6873  # pg advisory lock: two processes migrating at once take turns


@dataclass(frozen=True)
class StoredSession:
    """Everything a session actor needs to resume, read in one query."""

    messages: list[ChatMessage] = field(default_factory=list)
    memory: dict[str, str] = field(default_factory=dict)
    owner: str | None = None
    persona: str | None = None
    summary: str = ""
    known: bool = False
    """False for a session id the store has never seen."""


class HistoryStore:
    """The store at one database URL; every method is one short transaction.

    The schema is made (and an old SQLite file migrated) on first use in the
    running event loop, not in `__init__`: Ray actors and Serve replicas build
    their store before their loop runs, and a PostgreSQL pool belongs to one loop.
    """

    def __init__(self, url: str, root: Path | None = PROJECT_ROOT) -> None:
        """`url` as `actors.agent.db.Database` takes it; `root` resolves a
        relative SQLite path (the project root, never the cwd)."""
        self._db = Database(url, root=root)
        self._opened = False
        self._opening: asyncio.Lock | None = None

    @classmethod
    def from_config(cls, config: AppConfig) -> HistoryStore | None:
        """The store `session.history_db` (or `history_db_env`) names, None without one."""
        url = config.session.store_url()
        return cls(url) if url is not None else None

    def __repr__(self) -> str:
        return f"HistoryStore({self.display_url!r})"

    @property
    def display_url(self) -> str:
        """Where the store is, without a password: the only form to log."""
        return self._db.display_url

    @property
    def database(self) -> Database:
        return self._db

    async def open(self) -> HistoryStore:
        """Make the tables and add columns an older version lacked; idempotent.

        Every session actor opens the store as it starts, so the usual case,
        a database already up to date, is one reading query: no write lock
        (SQLite) and no schema lock (PostgreSQL) per actor."""
        if self._opened:
            return self
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            if not self._opened:
                if not await self._schema_is_current():
                    await self._db.create_schema(SCHEMA)
                    await self._migrate()
                self._opened = True
        return self

    async def _schema_is_current(self) -> bool:
        async with self._db.transaction(write=False) as tx:
            history = await self._columns(tx, "history")
            aliases = await self._columns(tx, "session_aliases")
        return bool(aliases) and {column for table, column, _ in MIGRATIONS if table == "history"} <= history

    async def close(self) -> None:
        await self._db.close()

    async def _migrate(self) -> None:
        async with self._db.transaction() as tx:  # SQLite: BEGIN IMMEDIATE serialises migrators
            if self._db.dialect == "postgresql":
                await tx.execute("SELECT pg_advisory_xact_lock(?)", _MIGRATION_LOCK_KEY)
            for table, column, declaration in MIGRATIONS:
                if column not in await self._columns(tx, table):
                    await tx.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")

    async def _columns(self, tx: Tx, table: str) -> set[str]:
        if self._db.dialect == "sqlite":
            rows = await tx.fetch("SELECT name FROM pragma_table_info(?)", table)
        else:
            rows = await tx.fetch("SELECT column_name AS name FROM information_schema.columns "
                                  "WHERE table_schema = current_schema() AND table_name = ?", table)
        return {r["name"] for r in rows}

    async def _tx(self, write: bool = True) -> Any:
        await self.open()
        return self._db.transaction(write=write)

    async def _one(self, sql: str, *params: Any) -> dict[str, Any] | None:
        async with await self._tx(write=False) as tx:
            return await tx.fetchone(sql, *params)

    # ------------------------------------------------------------ sessions

    async def snapshot(self, session_id: str) -> StoredSession:
        """The whole stored session in one round trip (a resuming actor's start)."""
        row = await self._one("SELECT messages, memory, owner, persona, summary FROM history WHERE session_id = ?",
                              session_id)
        if row is None:
            return StoredSession()
        return StoredSession([ChatMessage.model_validate(m) for m in json.loads(row["messages"])],
                             json.loads(row["memory"]), row["owner"], row["persona"], row["summary"] or "",
                             known=True)

    async def load(self, session_id: str) -> tuple[list[ChatMessage], dict[str, str]]:
        """→ (messages, remembered facts); empty for a session never saved."""
        stored = await self.snapshot(session_id)
        return stored.messages, stored.memory

    async def persona_of(self, session_id: str) -> str | None:
        row = await self._one("SELECT persona FROM history WHERE session_id = ?", session_id)
        return row["persona"] if row else None

    async def summary_of(self, session_id: str) -> str:
        row = await self._one("SELECT summary FROM history WHERE session_id = ?", session_id)
        return (row["summary"] or "") if row else ""

    async def owner_of(self, session_id: str) -> str | None:
        """The principal key that owns this session, or None if nobody has claimed it."""
        row = await self._one("SELECT owner FROM history WHERE session_id = ?", session_id)
        return row["owner"] if row else None

    async def known(self, session_id: str) -> bool:
        return await self._one("SELECT 1 AS one FROM history WHERE session_id = ?", session_id) is not None

    async def claim(self, session_id: str, owner: str) -> str:
        """Make `owner` the session's owner unless someone already is; → the
        owner now (`owner` when it won). One conditional statement, so two
        processes claiming the same id at once cannot both win: PostgreSQL
        locks the row for the second, which then sees the first one's owner;
        SQLite takes its write lock first."""
        async with await self._tx() as tx:
            row = await tx.fetchone(
                "INSERT INTO history (session_id, messages, memory, updated, owner) VALUES (?, '[]', '{}', ?, ?) "
                "ON CONFLICT (session_id) DO UPDATE SET owner = COALESCE(history.owner, excluded.owner) "
                "RETURNING owner", session_id, time.time(), owner)
        assert row is not None  # an upsert always returns its row
        return row["owner"]

    async def set_persona(self, session_id: str, persona: str) -> None:
        """Kept with the conversation, so a resumed session is the same persona."""
        async with await self._tx() as tx:
            await tx.execute("INSERT INTO history (session_id, messages, memory, updated, persona) "
                             "VALUES (?, '[]', '{}', ?, ?) "
                             "ON CONFLICT (session_id) DO UPDATE SET persona = excluded.persona",
                             session_id, time.time(), persona)

    async def save(self, session_id: str, messages: list[ChatMessage], memory: dict[str, str],
                   summary: str = "") -> None:
        """Replace the stored conversation with this one (written after each turn)."""
        payload = json.dumps([m.model_dump() for m in messages], ensure_ascii=False)
        facts = json.dumps(dict(memory), ensure_ascii=False)
        async with await self._tx() as tx:
            await tx.execute("INSERT INTO history (session_id, messages, memory, updated, summary) "
                             "VALUES (?, ?, ?, ?, ?) "
                             "ON CONFLICT (session_id) DO UPDATE SET messages = excluded.messages, "
                             "memory = excluded.memory, updated = excluded.updated, summary = excluded.summary",
                             session_id, payload, facts, time.time(), summary)

    async def forget(self, session_id: str) -> None:
        """Delete the stored conversation and its owner (a device's alias stays:
        the device comes back to the same, now empty, session id)."""
        async with await self._tx() as tx:
            await tx.execute("DELETE FROM history WHERE session_id = ?", session_id)

    # ------------------------------------------------------------ aliases (device → session)

    async def session_for(self, alias: str) -> str | None:
        """The session id bound to `alias` (a device id), None if never bound."""
        row = await self._one("SELECT session_id FROM session_aliases WHERE alias = ?", alias)
        return row["session_id"] if row else None

    async def bind_alias(self, alias: str, session_id: str) -> str:
        """Bind `alias` to `session_id` unless it is bound already; → the
        session it is bound to now. First writer wins, on every node."""
        async with await self._tx() as tx:
            await tx.execute("INSERT INTO session_aliases (alias, session_id, created) VALUES (?, ?, ?) "
                             "ON CONFLICT (alias) DO NOTHING", alias, session_id, time.time())
            row = await tx.fetchone("SELECT session_id FROM session_aliases WHERE alias = ?", alias)
        assert row is not None  # inserted, or there already
        return row["session_id"]
