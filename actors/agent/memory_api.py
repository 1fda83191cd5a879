"""What the HTTP routes for long-term memory do, without the web framework.

The ingress's route methods authenticate, take `principal.key` as the owner
and call one of these; each returns a plain dict to send as JSON or raises
`MemoryStoreError` (`http_status`, stable `code`, safe `message`). The owner
always comes from authentication, never from the request, so a caller can
only ever see and change their own memories.

Query parameters arrive as strings and bodies as whatever JSON the client
sent: both are checked here, as an attacker would send them.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Awaitable
from typing import Any, TypeVar

from actors.agent.db import DatabaseError
from actors.agent.memory import MemoryStore, MemoryStoreError
from actors.ingress.auth import principal_key

__all__ = ["MemoryStoreError", "add_memory", "delete_all_memories", "delete_memory", "device_owner",
           "export_memories", "list_memories"]

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_PAGE = 100
MAX_PAGE = 500
MAX_OFFSET = 100_000


def device_owner(device_id: str) -> str:
    """The owner of what a device remembered: the device's own principal
    (`device:<id>`), which is whom its sessions belong to. The routes under
    `/api/devices/{id}/memories` call the handlers below with it once the
    ingress has checked the caller owns the device (or is an admin), so the
    human manages their device's memories through the very same handlers."""
    return principal_key("device", device_id)


def _int_param(value: Any, name: str, default: int, lo: int, hi: int) -> int:
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        raise MemoryStoreError("memory.bad_request", f"{name} must be a whole number {lo}-{hi}")
    if isinstance(value, str):
        if not value.isascii() or not value.isdigit() or len(value) > 9:
            raise MemoryStoreError("memory.bad_request", f"{name} must be a whole number {lo}-{hi}")
        value = int(value)
    if not isinstance(value, int) or not lo <= value <= hi:
        raise MemoryStoreError("memory.bad_request", f"{name} must be a whole number {lo}-{hi}")
    return value


def _store(store: MemoryStore | None) -> MemoryStore:
    if store is None or not store.config.enabled:
        raise MemoryStoreError("memory.disabled")
    return store


def _unavailable_errors() -> tuple[type[BaseException], ...]:
    errors: tuple[type[BaseException], ...] = (DatabaseError, sqlite3.Error, OSError)
    try:
        import asyncpg
    except ImportError:  # pragma: no cover - asyncpg is a dependency
        return errors
    return (*errors, asyncpg.PostgresError, asyncpg.InterfaceError)


async def _guard(call: Awaitable[T]) -> T:
    """The database failing is the server's problem, not the caller's: 503,
    logged by error type only (a driver message may quote the connection)."""
    try:
        return await call
    except MemoryStoreError:
        raise
    except _unavailable_errors() as e:
        log.warning("memory store unavailable: %s", type(e).__name__)
        raise MemoryStoreError("memory.unavailable") from None


async def list_memories(store: MemoryStore | None, owner: str, limit: Any = None, offset: Any = None) -> dict[str, Any]:
    """`GET /api/memories?limit=&offset=`: a page of the caller's memories, newest first."""
    store = _store(store)
    limit = _int_param(limit, "limit", DEFAULT_PAGE, 1, MAX_PAGE)
    offset = _int_param(offset, "offset", 0, 0, MAX_OFFSET)
    total = await _guard(store.count(owner))
    memories = await _guard(store.list(owner, limit=limit, offset=offset))
    return {"memories": [m.to_dict() for m in memories], "total": total, "limit": limit, "offset": offset,
            "max": store.config.max_per_user}


async def export_memories(store: MemoryStore | None, owner: str) -> dict[str, Any]:
    """`GET /api/memories/export`: everything stored for the caller, as one JSON document."""
    return await _guard(_store(store).export(owner))


async def add_memory(store: MemoryStore | None, owner: str, body: Any) -> dict[str, Any]:
    """`POST /api/memories` with `{"text": "..."}`: keep a fact on request (pinned).

    → `{"memory": {...}}`; a restated fact returns the existing memory updated.
    """
    store = _store(store)
    if not isinstance(body, dict) or set(body) != {"text"} or not isinstance(body["text"], str):
        raise MemoryStoreError("memory.bad_request", 'send {"text": "..."}')
    memory = await _guard(store.remember(owner, body["text"], source="user"))
    return {"memory": memory.to_dict()}


async def delete_memory(store: MemoryStore | None, owner: str, memory_id: Any) -> dict[str, Any]:
    """`DELETE /api/memories/{memory_id}`: forget one; another owner's id is 404, like a missing one."""
    store = _store(store)
    if not isinstance(memory_id, str):
        raise MemoryStoreError("memory.not_found")
    await _guard(store.delete(owner, memory_id))
    return {"deleted": memory_id}


async def delete_all_memories(store: MemoryStore | None, owner: str) -> dict[str, Any]:
    """`DELETE /api/memories`: forget everything the caller has."""
    return {"deleted": await _guard(_store(store).delete_all(owner))}
