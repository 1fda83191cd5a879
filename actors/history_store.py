"""Conversation history, remembered facts and the session's owner, outside
the actor (DESIGN §6), so a session actor that crashed, was reaped or was
restarted resumes without losing a turn, and only for the principal that
owns it.

SQLite by default: one row per session holding its owner and its messages and
memory as JSON, written after each turn. A file on one node; a cluster needs a
shared database (PostgreSQL) behind the same methods.
"""

from __future__ import annotations

import asyncio
import json
import time

from actors.providers.base import ChatMessage
from actors.sqlite_store import SqliteStore


class HistoryStore(SqliteStore):
    schema = ("""CREATE TABLE IF NOT EXISTS history (
        session_id TEXT PRIMARY KEY,
        messages   TEXT NOT NULL,
        memory     TEXT NOT NULL DEFAULT '{}',
        updated    REAL NOT NULL,
        owner      TEXT,
        persona    TEXT,
        summary    TEXT NOT NULL DEFAULT '')""",)
    migrations = (("history", "owner", "TEXT"), ("history", "persona", "TEXT"),
                  ("history", "summary", "TEXT NOT NULL DEFAULT ''"))

    def load(self, session_id: str) -> tuple[list[ChatMessage], dict[str, str]]:
        """→ (messages, remembered facts); empty for a session never saved."""
        with self._connect() as db:
            row = db.execute("SELECT messages, memory FROM history WHERE session_id = ?",
                             (session_id,)).fetchone()
        if row is None:
            return [], {}
        return [ChatMessage.model_validate(m) for m in json.loads(row[0])], json.loads(row[1])

    def persona_of(self, session_id: str) -> str | None:
        with self._connect() as db:
            row = db.execute("SELECT persona FROM history WHERE session_id = ?", (session_id,)).fetchone()
        return row[0] if row else None

    def set_persona(self, session_id: str, persona: str) -> None:
        """Kept with the conversation, so a resumed session is the same persona."""
        with self._lock, self._connect() as db:
            db.execute("INSERT INTO history (session_id, messages, memory, updated, persona) "
                       "VALUES (?, '[]', '{}', ?, ?) ON CONFLICT(session_id) DO UPDATE SET persona = excluded.persona",
                       (session_id, time.time(), persona))

    def summary_of(self, session_id: str) -> str:
        with self._connect() as db:
            row = db.execute("SELECT summary FROM history WHERE session_id = ?", (session_id,)).fetchone()
        return row[0] if row else ""

    def owner_of(self, session_id: str) -> str | None:
        """The principal key that owns this session, or None if nobody has claimed it."""
        with self._connect() as db:
            row = db.execute("SELECT owner FROM history WHERE session_id = ?", (session_id,)).fetchone()
        return row[0] if row else None

    def known(self, session_id: str) -> bool:
        with self._connect() as db:
            return db.execute("SELECT 1 FROM history WHERE session_id = ?", (session_id,)).fetchone() is not None

    def claim(self, session_id: str, owner: str) -> bool:
        """Make `owner` the session's owner unless someone already is; True
        when `owner` owns it now. One statement, so two processes claiming
        the same id at once cannot both win."""
        with self._lock, self._connect() as db:
            db.execute("INSERT INTO history (session_id, messages, memory, updated, owner) "
                       "VALUES (?, '[]', '{}', ?, ?) "
                       "ON CONFLICT(session_id) DO UPDATE SET owner = COALESCE(history.owner, excluded.owner)",
                       (session_id, time.time(), owner))
            row = db.execute("SELECT owner FROM history WHERE session_id = ?", (session_id,)).fetchone()
        return row is not None and row[0] == owner

    def save_sync(self, session_id: str, messages: list[ChatMessage], memory: dict[str, str],
                  summary: str = "") -> None:
        payload = json.dumps([m.model_dump() for m in messages], ensure_ascii=False)
        facts = json.dumps(memory, ensure_ascii=False)
        with self._lock, self._connect() as db:
            db.execute("INSERT INTO history (session_id, messages, memory, updated, summary) VALUES (?, ?, ?, ?, ?) "
                       "ON CONFLICT(session_id) DO UPDATE SET messages = excluded.messages, "
                       "memory = excluded.memory, updated = excluded.updated, summary = excluded.summary",
                       (session_id, payload, facts, time.time(), summary))

    async def save(self, session_id: str, messages: list[ChatMessage], memory: dict[str, str],
                   summary: str = "") -> None:
        await asyncio.to_thread(self.save_sync, session_id, messages, dict(memory), summary)

    def forget(self, session_id: str) -> None:
        with self._lock, self._connect() as db:
            db.execute("DELETE FROM history WHERE session_id = ?", (session_id,))
