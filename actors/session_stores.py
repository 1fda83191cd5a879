"""The stores a session actor keeps open across the sessions it hosts.

A session actor hosts one session after another (actors/session_ref.py).
Opening the history store and the long-term memory store for each one cost
a connect its client waited for: the memory store's schema check is a write
transaction, and it was opened when the client claimed the session, on the
way to `hello` (docs/benchmarks.md, "Where connect -> hello goes"). The
stores hold no session's state (every call names its session or owner), so
one pair per actor serves every session it hosts; a new config naming other
databases (a notebook's spare serving the server) gets new ones.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from actors.history_store import HistoryStore

if TYPE_CHECKING:
    from actors.agent.memory import MemoryStore
    from actors.config import AppConfig, MemoryConfig

log = logging.getLogger(__name__)


class ActorStores:
    def __init__(self) -> None:
        self._history: HistoryStore | None = None
        self._history_url: str | None = None
        self._memory: MemoryStore | None = None
        self._memory_config: MemoryConfig | None = None
        self._memory_lock: asyncio.Lock | None = None

    def history(self, config: AppConfig) -> HistoryStore | None:
        """The history store `config` names (None without one), kept open."""
        url = config.session.store_url()
        if url != self._history_url:
            self._retire(self._history)
            self._history, self._history_url = (HistoryStore(url) if url is not None else None), url
        return self._history

    async def memory(self, config: AppConfig) -> MemoryStore | None:
        """The long-term memory store `config` names, opened; None when memory
        is off. Raises when its database cannot be opened (the caller goes on
        without memory, and the next call tries again)."""
        if not config.memory.enabled:
            return None
        if self._memory_lock is None:
            self._memory_lock = asyncio.Lock()
        async with self._memory_lock:
            if self._memory is None or self._memory_config != config.memory:
                from actors.agent.memory import MemoryStore

                self._retire(self._memory)
                self._memory, self._memory_config = MemoryStore(config.memory), config.memory
            try:
                return await self._memory.open()
            except Exception:
                self._memory = None
                raise

    def open_memory_ahead(self, config: AppConfig, session_id: str) -> None:
        """Open the memory store in the background (a warm session's claim then finds it open)."""
        if not config.memory.enabled:
            return

        async def run() -> None:
            try:
                await self.memory(config)
            except Exception as e:  # the claim tries again and says so
                log.info("session %s: memory store not opened ahead: %s", session_id, type(e).__name__)

        asyncio.get_running_loop().create_task(run())

    async def close(self) -> None:
        for store in (self._history, self._memory):
            if store is not None:
                await store.close()
        self._history = self._memory = None
        self._history_url = self._memory_config = None

    @staticmethod
    def _retire(store: HistoryStore | MemoryStore | None) -> None:
        if store is not None:
            asyncio.get_running_loop().create_task(store.close())
