"""Which xiaozhi devices are admitted, and the activation codes of those
waiting to be.

The xiaozhi firmware's own flow: its OTA request gets an `activation` answer
with a six-digit code, which the device shows or speaks; the device's owner
types that code into the server (`POST /api/devices/activate`), and from then
on the OTA answer carries the device's WebSocket URL and token. Admitted
devices and pending codes live in the server's SQLite file, so every ingress
replica agrees and a restart forgets nobody.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any

from actors.sqlite_store import SqliteStore


@dataclass(frozen=True)
class PendingActivation:
    device_id: str
    code: str
    challenge: str
    expires: float


class DeviceRegistry(SqliteStore):
    schema = (
        """CREATE TABLE IF NOT EXISTS devices (
            device_id TEXT PRIMARY KEY,
            client_id TEXT NOT NULL,
            owner     TEXT,
            admitted  REAL NOT NULL,
            how       TEXT NOT NULL,
            persona   TEXT)""",
        """CREATE TABLE IF NOT EXISTS device_activations (
            device_id TEXT PRIMARY KEY,
            client_id TEXT NOT NULL,
            code      TEXT NOT NULL UNIQUE,
            challenge TEXT NOT NULL,
            expires   REAL NOT NULL)""",
    )

    migrations = (("devices", "persona", "TEXT"),)

    def is_admitted(self, device_id: str) -> bool:
        return self.lookup(device_id)[0]

    def lookup(self, device_id: str) -> tuple[bool, str | None]:
        """(admitted, the persona its owner chose) in one query: a device's
        connect asks both, on the way to its `hello`."""
        with self._connect() as db:
            row = db.execute("SELECT persona FROM devices WHERE device_id = ?", (device_id,)).fetchone()
        return (row is not None, row[0] if row else None)

    def admit(self, device_id: str, client_id: str, owner: str | None, how: str) -> None:
        """Admit a device (an owner given: theirs). One admitted already, with
        no owner to set, is left as it is without a write: every boot of an
        allow-listed or loopback device asks here, and in a burst of them the
        writes queued behind each other and behind the sessions' own for the
        file's one write lock."""
        if owner is None and self.lookup(device_id)[0]:
            return
        with self._lock, self._connect() as db:
            db.execute("INSERT INTO devices (device_id, client_id, owner, admitted, how) VALUES (?, ?, ?, ?, ?) "
                       "ON CONFLICT(device_id) DO UPDATE SET owner = COALESCE(excluded.owner, devices.owner)",
                       (device_id, client_id, owner, time.time(), how))
            db.execute("DELETE FROM device_activations WHERE device_id = ?", (device_id,))

    def pending(self, device_id: str, client_id: str, ttl_s: float, max_pending: int) -> PendingActivation | None:
        """The device's live activation code, a new one if it had none; None
        when `max_pending` devices are already waiting (a flood of made-up
        device ids must not grow the table without bound)."""
        now = time.time()
        with self._lock, self._connect() as db:
            db.execute("DELETE FROM device_activations WHERE expires <= ?", (now,))
            row = db.execute("SELECT code, challenge, expires FROM device_activations WHERE device_id = ?",
                             (device_id,)).fetchone()
            if row is not None:
                return PendingActivation(device_id, row[0], row[1], row[2])
            if db.execute("SELECT COUNT(*) FROM device_activations").fetchone()[0] >= max_pending:
                return None
            while True:
                code = f"{secrets.randbelow(1_000_000):06d}"
                if db.execute("SELECT 1 FROM device_activations WHERE code = ?", (code,)).fetchone() is None:
                    break
            challenge = secrets.token_hex(16)
            db.execute("INSERT INTO device_activations VALUES (?, ?, ?, ?, ?)",
                       (device_id, client_id, code, challenge, now + ttl_s))
        return PendingActivation(device_id, code, challenge, now + ttl_s)

    def confirm(self, code: str, owner: str) -> str | None:
        """Admit the device waiting with `code`, owned by `owner`; → its id,
        or None for a code that is unknown or expired."""
        with self._lock, self._connect() as db:
            row = db.execute("SELECT device_id, client_id FROM device_activations WHERE code = ? AND expires > ?",
                             (code, time.time())).fetchone()
            if row is None:
                return None
            db.execute("DELETE FROM device_activations WHERE device_id = ?", (row[0],))
            db.execute("INSERT INTO devices (device_id, client_id, owner, admitted, how) VALUES (?, ?, ?, ?, ?) "
                       "ON CONFLICT(device_id) DO UPDATE SET owner = excluded.owner",
                       (row[0], row[1], owner, time.time(), "activation"))
        return row[0]

    def list(self, owner: str | None = None) -> list[dict[str, Any]]:
        """Admitted devices; only `owner`'s when given."""
        query = "SELECT device_id, client_id, owner, admitted, how, persona FROM devices"
        args: tuple[Any, ...] = ()
        if owner is not None:
            query, args = query + " WHERE owner = ?", (owner,)
        with self._connect() as db:
            rows = db.execute(query + " ORDER BY admitted", args).fetchall()
        return [{"device_id": r[0], "client_id": r[1], "owner": r[2], "admitted_at": r[3], "admitted_by": r[4],
                 "persona": r[5]} for r in rows]

    def owner_of(self, device_id: str) -> str | None:
        with self._connect() as db:
            row = db.execute("SELECT owner FROM devices WHERE device_id = ?", (device_id,)).fetchone()
        return row[0] if row else None

    def persona_of(self, device_id: str) -> str | None:
        """The persona the device's owner chose for it, if any."""
        return self.lookup(device_id)[1]

    def set_persona(self, device_id: str, persona: str | None) -> bool:
        with self._lock, self._connect() as db:
            return db.execute("UPDATE devices SET persona = ? WHERE device_id = ?",
                              (persona, device_id)).rowcount > 0

    def revoke(self, device_id: str) -> bool:
        with self._lock, self._connect() as db:
            return db.execute("DELETE FROM devices WHERE device_id = ?", (device_id,)).rowcount > 0
