"""Connections that owe the device gateway a request: timed and capped.

uvicorn keeps a TCP connection that never sends a request, or sends its
headers a byte at a time, for as long as the peer likes: it has no timeout
for reading a request (checked: a bare connection and one with half its
headers were both still open after 30 s). The gateway's process may hold
20,000 files, so one machine on the LAN could hold them all and lock every
device out. Here each connection has `limits.request_read_s` to deliver a
whole request (headers and body), counted again after each response; while
the server works on a request it is not the peer's time. A connection that
becomes a WebSocket leaves this guard: the hello timeout, the socket's idle
timeout and the session caps hold it from there. An address may hold
`limits.pending_connections_per_address` such connections at once and the
process `limits.max_pending_connections`; past either, the connection is
closed as it opens.

Serve's own port runs Serve's uvicorn, which this cannot reach
(docs/security.md, "Known limits").
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from typing import Any

REFUSED = "limit.connections"
"""A connection closed as it opened: its address, or the process, holds too many that owe a request."""
TIMED_OUT = "limit.request_timeout"
"""A connection closed because its request did not arrive whole in time."""


class PendingConnections:
    """Connections that owe a request, by address, with both caps."""

    def __init__(self, per_address: int, total: int) -> None:
        self.per_address = per_address
        self.total_cap = total
        self._by_address: Counter[str] = Counter()
        self.total = 0

    def admit(self, address: str) -> bool:
        if self.total >= self.total_cap or self._by_address[address] >= self.per_address:
            return False
        self._by_address[address] += 1
        self.total += 1
        return True

    def release(self, address: str) -> None:
        self.total -= 1
        left = self._by_address[address] - 1
        if left:
            self._by_address[address] = left
        else:
            del self._by_address[address]


def guarded_protocol(base: type[Any], pending: PendingConnections, read_s: float,
                     refused: Callable[[str], None]) -> type[Any]:
    """`base` (uvicorn's h11 or httptools protocol class), with each
    connection admitted by `pending` and closed when it owes a request for
    longer than `read_s`; `refused(code)` hears of every connection closed."""

    class GuardedProtocol(base):  # type: ignore[misc, valid-type]
        _guard_address: str | None = None
        _guard_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            peer = transport.get_extra_info("peername")
            address = str(peer[0]) if peer else "unknown"
            if not pending.admit(address):
                refused(REFUSED)
                transport.close()
                return
            self._guard_address = address
            self._arm()

        def _arm(self) -> None:
            if self._guard_timer is not None:
                self._guard_timer.cancel()
            self._guard_timer = self.loop.call_later(read_s, self._expired)

        def _expired(self) -> None:
            self._guard_timer = None
            if self._guard_address is None:
                return
            cycle = self.cycle
            owed = cycle is None or cycle.response_complete or cycle.more_body
            if not owed:  # the request is in: the server's turn, not the peer's
                self._arm()
                return
            refused(TIMED_OUT)
            self.transport.close()

        def _release(self) -> None:
            if self._guard_timer is not None:
                self._guard_timer.cancel()
                self._guard_timer = None
            if self._guard_address is not None:
                pending.release(self._guard_address)
                self._guard_address = None

        def handle_websocket_upgrade(self, *args: Any) -> None:
            self._release()  # a socket now: the session's limits hold it
            super().handle_websocket_upgrade(*args)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self._guard_address is not None:
                self._arm()  # kept alive: the next request is owed from now

        def connection_lost(self, exc: Exception | None) -> None:
            self._release()
            super().connection_lost(exc)

    return GuardedProtocol
