"""Conversation history and remembered facts outside the actor (DESIGN §6),
so a session actor that crashed or was restarted resumes without losing a
turn or what the user asked it to remember.

SQLite by default: one row per session holding its messages and memory as
JSON, written after each turn. A file on one node; a cluster needs a shared
database (PostgreSQL) behind the same two methods.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from pathlib import Path

from actors.providers.base import ChatMessage

_SCHEMA = """CREATE TABLE IF NOT EXISTS history (
    session_id TEXT PRIMARY KEY,
    messages   TEXT NOT NULL,
    memory     TEXT NOT NULL DEFAULT '{}',
    updated    REAL NOT NULL)"""


class HistoryStore:
    def __init__(self, path: str | Path) -> None:
        self._path = Path(path)
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        # one short-lived connection per call: several session actors (processes) share the file
        return sqlite3.connect(self._path, timeout=10.0)

    def load(self, session_id: str) -> tuple[list[ChatMessage], dict[str, str]]:
        """→ (messages, remembered facts); empty for a session never saved."""
        with self._connect() as db:
            row = db.execute("SELECT messages, memory FROM history WHERE session_id = ?",
                             (session_id,)).fetchone()
        if row is None:
            return [], {}
        return [ChatMessage.model_validate(m) for m in json.loads(row[0])], json.loads(row[1])

    def save_sync(self, session_id: str, messages: list[ChatMessage], memory: dict[str, str]) -> None:
        payload = json.dumps([m.model_dump() for m in messages], ensure_ascii=False)
        facts = json.dumps(memory, ensure_ascii=False)
        with self._lock, self._connect() as db:
            db.execute("INSERT INTO history (session_id, messages, memory, updated) VALUES (?, ?, ?, ?) "
                       "ON CONFLICT(session_id) DO UPDATE SET messages = excluded.messages, "
                       "memory = excluded.memory, updated = excluded.updated",
                       (session_id, payload, facts, time.time()))

    async def save(self, session_id: str, messages: list[ChatMessage], memory: dict[str, str]) -> None:
        await asyncio.to_thread(self.save_sync, session_id, messages, dict(memory))

    def forget(self, session_id: str) -> None:
        with self._lock, self._connect() as db:
            db.execute("DELETE FROM history WHERE session_id = ?", (session_id,))
