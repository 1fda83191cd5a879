"""The one way this server opens its SQLite file (DESIGN §6): short-lived
connections, because several processes (session actors, ingress replicas)
share the file; WAL so readers do not wait for a writer; writes from one
process serialised by a lock."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path


class SqliteStore:
    schema: tuple[str, ...] = ()
    """CREATE statements run once when the store is opened."""
    migrations: tuple[tuple[str, str, str], ...] = ()
    """(table, column, declaration): columns added to files made by an older version."""

    def __init__(self, path: str | Path) -> None:
        self._path = Path(path)
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            for statement in self.schema:
                db.execute(statement)
            for table, column, declaration in self.migrations:
                columns = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
                if column not in columns:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")

    @property
    def path(self) -> Path:
        return self._path

    def check_writable(self) -> None:
        """Raise unless a write transaction can start now (disk full, file
        read-only or locked for too long all raise): for /health."""
        db = self._connect()
        try:
            db.execute("BEGIN IMMEDIATE")
            db.rollback()
        finally:
            db.close()

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self._path, timeout=10.0)
