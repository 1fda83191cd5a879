"""One small async driver layer over SQLite (`aiosqlite`) and PostgreSQL
(`asyncpg`), so a store's SQL is written once.

Why not an ORM: the stores here are a handful of tables and statements; what
differs between the two databases is only how to connect, the parameter
placeholder (`?` vs `$1`), how a row count comes back and how a writer is
serialised. This module hides exactly those and nothing else.

Write SQL in the portable subset both accept: `?` placeholders, `TEXT`,
`INTEGER`, `DOUBLE PRECISION`, `ON CONFLICT ... DO UPDATE/NOTHING`,
`CREATE TABLE/INDEX IF NOT EXISTS`, ids made in Python.

SQLite: one connection per `Database`, kept open in the event loop that
first used it, its transactions taken in turn (opening one per transaction
cost a thread start and a file open, ~2.4 ms and 1.7 ms of CPU each, on
every turn's save and every connect; docs/benchmarks.md). Several processes
share the file, so WAL (readers do not wait for a writer) and `BEGIN
IMMEDIATE` so a read-then-write transaction holds the write lock from its
first statement. Another event loop (a notebook's helper thread) gets a
short-lived connection per transaction, as before. PostgreSQL: a small
connection pool made on first use in the running event loop.

A URL may carry a password; only `redact_url(url)` ever goes into a log
line or an error message.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit, urlunsplit

Dialect = Literal["sqlite", "postgresql"]
Row = dict[str, Any]

_SQLITE_TIMEOUT_S = 10.0
_PG_POOL_MAX = 4
_PG_COMMAND_TIMEOUT_S = 30.0
_SCHEMA_LOCK_KEY = 0x766F_6963  # pg advisory lock id: schema creation by several processes at once


async def _set_wal(conn: Any, attempts: int = 40, pause_s: float = 0.05) -> None:
    """WAL mode, retried while another process holds the file: SQLite
    answers the switch "database is locked" at once, without its busy
    timeout, while processes open a new file together (two sessions starting
    at once on a fresh store failed their start that way). The pragma answers
    a row: its cursor is closed, or the open statement keeps a read lock that
    refuses the other processes' writes (their BEGIN IMMEDIATE, at once)."""
    for attempt in range(attempts):
        try:
            cursor = await conn.execute("PRAGMA journal_mode=WAL")
            await cursor.close()
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == attempts - 1:
                raise
            await asyncio.sleep(pause_s)


class DatabaseError(RuntimeError):
    """The database could not be reached or opened; the message never holds a password."""


def redact_url(url: str) -> str:
    """The URL with any password replaced by `***`: the only form that is logged."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable database url>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def dialect_of(url: str) -> Dialect:
    if url.startswith("sqlite://"):
        return "sqlite"
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql"
    raise DatabaseError(f"unsupported database url {redact_url(url)!r}: use sqlite:///path or postgresql://...")


def sqlite_path(url: str, root: Path | None = None) -> Path:
    """`sqlite:///rel/path` → root/rel/path; `sqlite:////abs/path` → /abs/path.

    In-memory databases are refused: with a connection per transaction each
    would be a new, empty database.
    """
    raw = url[len("sqlite://"):]
    if not raw.startswith("/") or raw in ("/", "/:memory:"):
        raise DatabaseError("sqlite url must be sqlite:///relative/path or sqlite:////absolute/path")
    raw = raw[1:]
    path = Path(raw)
    if not path.is_absolute() and root is not None:
        path = root / path
    return path


_PLACEHOLDER = re.compile(r"'(?:[^']|'')*'|\?")


def to_numbered(sql: str) -> str:
    """`?` placeholders → `$1, $2, …` (asyncpg), leaving `?` inside string literals alone."""
    counter = 0

    def number(match: re.Match[str]) -> str:
        nonlocal counter
        if match.group(0) != "?":
            return match.group(0)
        counter += 1
        return f"${counter}"

    return _PLACEHOLDER.sub(number, sql)


class Tx(Protocol):
    """What a transaction offers: the same three calls on either database."""

    async def execute(self, sql: str, *params: Any) -> int:
        """Run a statement; → rows affected (0 where the database does not say)."""

    async def fetch(self, sql: str, *params: Any) -> list[Row]: ...

    async def fetchone(self, sql: str, *params: Any) -> Row | None: ...


class _SqliteTx:
    def __init__(self, conn: Any) -> None:
        self._conn = conn

    async def execute(self, sql: str, *params: Any) -> int:
        cursor = await self._conn.execute(sql, params)
        try:
            return max(cursor.rowcount, 0)
        finally:
            await cursor.close()

    async def fetch(self, sql: str, *params: Any) -> list[Row]:
        async with self._conn.execute(sql, params) as cursor:
            rows = await cursor.fetchall()
            names = [d[0] for d in cursor.description or ()]
        return [dict(zip(names, row)) for row in rows]

    async def fetchone(self, sql: str, *params: Any) -> Row | None:
        rows = await self.fetch(sql, *params)
        return rows[0] if rows else None


class _PgTx:
    def __init__(self, conn: Any) -> None:
        self._conn = conn

    async def execute(self, sql: str, *params: Any) -> int:
        status = await self._conn.execute(to_numbered(sql), *params)
        # asyncpg answers with the command tag, e.g. "DELETE 3" or "INSERT 0 1".
        last = status.rsplit(" ", 1)[-1] if isinstance(status, str) else ""
        return int(last) if last.isdigit() else 0

    async def fetch(self, sql: str, *params: Any) -> list[Row]:
        return [dict(r) for r in await self._conn.fetch(to_numbered(sql), *params)]

    async def fetchone(self, sql: str, *params: Any) -> Row | None:
        row = await self._conn.fetchrow(to_numbered(sql), *params)
        return dict(row) if row is not None else None


class _SqliteConn:
    """A SQLite connection and whether it is still fit for the next transaction."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.clean = True
        """False once a BEGIN, COMMIT or ROLLBACK failed: its state is unknown, so it is not used again."""

    @asynccontextmanager
    async def transaction(self, write: bool) -> AsyncIterator[Tx]:
        """Commit when the block ends, roll back when it raises (the block's
        own error is what propagates)."""
        try:
            await self.conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        except BaseException:
            self.clean = False
            raise
        try:
            yield _SqliteTx(self.conn)
        except BaseException:
            try:
                await self.conn.execute("ROLLBACK")
            except BaseException:
                self.clean = False
            raise
        try:
            await self.conn.execute("COMMIT")
        except BaseException:
            self.clean = False
            raise


class Database:
    """A database named by a URL; every statement runs in a short transaction.

    `root` resolves a relative SQLite path (the project root, like
    `AppConfig.resolve_path`), never the current directory.
    """

    def __init__(self, url: str, root: Path | None = None) -> None:
        self.dialect: Dialect = dialect_of(url)
        self._url = url
        self._path = sqlite_path(url, root) if self.dialect == "sqlite" else None
        self._pool: Any = None
        self._pool_lock: asyncio.Lock | None = None
        self._kept: _SqliteConn | None = None
        """The kept SQLite connection, once opened."""
        self._kept_loop: asyncio.AbstractEventLoop | None = None
        self._kept_lock: asyncio.Lock | None = None

    def __repr__(self) -> str:
        return f"Database({redact_url(self._url)!r})"

    @property
    def display_url(self) -> str:
        return redact_url(self._url) if self._path is None else f"sqlite:///{self._path}"

    @asynccontextmanager
    async def transaction(self, write: bool = True) -> AsyncIterator[Tx]:
        """Commit when the block ends, roll back when it raises.

        Keep the block short: with `write` it holds SQLite's write lock from
        the first statement (so a read-then-write decision cannot race another
        process); `write=False` lets readers run beside a writer (WAL). On
        PostgreSQL it holds a pooled connection; lock rows to serialise there.
        """
        if self._path is not None:
            async with self._sqlite_tx(write) as tx:
                yield tx
        else:
            pool = await self._pg_pool()
            async with pool.acquire() as conn, conn.transaction():
                yield _PgTx(conn)

    async def execute(self, sql: str, *params: Any) -> int:
        async with self.transaction() as tx:
            return await tx.execute(sql, *params)

    async def fetch(self, sql: str, *params: Any) -> list[Row]:
        """One query in a reading transaction."""
        async with self.transaction(write=False) as tx:
            return await tx.fetch(sql, *params)

    async def fetchone(self, sql: str, *params: Any) -> Row | None:
        async with self.transaction(write=False) as tx:
            return await tx.fetchone(sql, *params)

    async def create_schema(self, statements: Iterable[str]) -> None:
        """Run `CREATE ... IF NOT EXISTS` statements in one transaction.

        On PostgreSQL two processes creating the same table at once can collide
        in the catalogue even with IF NOT EXISTS, so an advisory lock makes
        them take turns.
        """
        async with self.transaction() as tx:
            if self.dialect == "postgresql":
                await tx.execute("SELECT pg_advisory_xact_lock(?)", _SCHEMA_LOCK_KEY)
            for statement in statements:
                await tx.execute(statement)

    async def close(self) -> None:
        """Close the PostgreSQL pool or the kept SQLite connection."""
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()
        if self._kept is not None and self._kept_lock is not None:
            async with self._kept_lock:
                await self._drop_kept()

    async def _drop_kept(self) -> None:
        kept, self._kept = self._kept, None
        if kept is not None:
            try:
                await kept.conn.close()
            except Exception:  # its thread is gone already: nothing left to close
                pass

    # ---- drivers

    async def _sqlite_connect(self) -> Any:
        import aiosqlite

        assert self._path is not None
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            pending = aiosqlite.connect(self._path, timeout=_SQLITE_TIMEOUT_S, isolation_level=None)
            # aiosqlite's thread is not a daemon: a kept connection nobody closed (a script that
            # returns, a test) would hold the process open at exit. SQLite is transactional, so a
            # write cut by the exit is rolled back by the next opener.
            thread = getattr(pending, "_thread", None)
            if thread is not None:
                thread.daemon = True
            conn = await pending
            await _set_wal(conn)
        except (OSError, sqlite3.Error) as exc:
            raise DatabaseError(f"cannot open {self.display_url}: {type(exc).__name__}") from None
        return conn

    @asynccontextmanager
    async def _sqlite_tx(self, write: bool) -> AsyncIterator[Tx]:
        loop = asyncio.get_running_loop()
        if self._kept_loop is None:
            self._kept_loop, self._kept_lock = loop, asyncio.Lock()
        if self._kept_loop is not loop:  # another loop: a connection of its own, for this transaction
            conn = _SqliteConn(await self._sqlite_connect())
            try:
                async with conn.transaction(write) as tx:
                    yield tx
            finally:
                await conn.conn.close()
            return
        assert self._kept_lock is not None
        async with self._kept_lock:
            if self._kept is None:
                self._kept = _SqliteConn(await self._sqlite_connect())
            kept = self._kept
            try:
                async with kept.transaction(write) as tx:
                    yield tx
            finally:
                if not kept.clean:
                    await self._drop_kept()  # the next transaction opens a fresh one

    async def _pg_pool(self) -> Any:
        if self._pool is not None:
            return self._pool
        if self._pool_lock is None:
            self._pool_lock = asyncio.Lock()
        async with self._pool_lock:
            if self._pool is None:
                import asyncpg

                try:
                    self._pool = await asyncpg.create_pool(
                        self._url, min_size=0, max_size=_PG_POOL_MAX, command_timeout=_PG_COMMAND_TIMEOUT_S)
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                    # The driver's message can quote the DSN; ours names only the redacted URL.
                    raise DatabaseError(f"cannot connect to {redact_url(self._url)}: {type(exc).__name__}") from None
        return self._pool

