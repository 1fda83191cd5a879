"""Back-pressure for the ingress: request rates, concurrent sessions, sizes.

These are per-replica, in-memory guards (no Ray, no shared store): they keep
one noisy client from starving the others on a replica, not an exact global
quota. Clocks are injectable so tests never sleep.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from types import TracebackType
from typing import Any

_LIMIT_ERRORS: dict[str, tuple[int, int, str]] = {
    "limit.rate": (429, 4429, "too many requests"),
    "limit.sessions": (429, 4429, "server is at its session limit"),
    "limit.client_sessions": (429, 4429, "too many sessions for this client"),
    "limit.too_large": (413, 1009, "message too large"),
    "limit.auth_failures": (429, 4429, "too many failed attempts; wait before trying again"),
    "limit.live_sessions": (429, 4429, "this caller holds as many live sessions as it may"),
    "limit.cluster_sessions": (503, 4503, "the server holds as many live sessions as its nodes allow"),
    "limit.pending_activations": (429, 4429, "too many devices are waiting for activation"),
    "limit.starting_sessions": (503, 4503, "too many new sessions are starting; try again shortly"),
}


class LimitError(Exception):
    """A limit was hit; `code` is stable, `retry_after_s` tells a client when to retry.

    Carries both the HTTP status and the WebSocket close code so every
    transport reports the same refusal the same way (1009 is the standard
    "message too big" close code).
    """

    def __init__(self, code: str, message: str | None = None,
                 retry_after_s: float | None = None) -> None:
        http_status, ws_close_code, default_message = _LIMIT_ERRORS.get(
            code, (429, 4429, "limit exceeded"))
        self.code = code
        self.message = message or default_message
        self.retry_after_s = retry_after_s
        self.http_status = http_status
        self.ws_close_code = ws_close_code
        super().__init__(self.message)

    def __reduce__(self) -> tuple[Any, ...]:
        # Keeps code and retry hint when the error crosses a process boundary.
        return (type(self), (self.code, self.message, self.retry_after_s))


class RateLimiter:
    """Token bucket per key: `burst` requests at once, refilled at `rate_per_minute`.

    Buckets live in an LRU map capped at `max_keys` so a flood of distinct
    keys (spoofed IPs, random device ids) cannot grow memory without bound;
    an evicted key simply starts again with a full bucket.
    """

    def __init__(self, rate_per_minute: float, burst: int,
                 clock: Callable[[], float] = time.monotonic, max_keys: int = 100_000) -> None:
        if rate_per_minute <= 0 or burst < 1 or max_keys < 1:
            raise ValueError("rate_per_minute must be > 0, burst and max_keys >= 1")
        self._rate_per_s = rate_per_minute / 60.0
        self._burst = float(burst)
        self._clock = clock
        self._max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """Number of keys currently tracked (bounded by max_keys)."""
        return len(self._buckets)

    def check(self, key: str) -> None:
        """Spend one token for `key`, or raise `LimitError("limit.rate")`."""
        with self._lock:
            now = self._clock()
            tokens = self._refilled(key, now)
            if tokens < 1.0:
                self._store(key, tokens, now)
                raise LimitError("limit.rate", retry_after_s=(1.0 - tokens) / self._rate_per_s)
            self._store(key, tokens - 1.0, now)

    def _refilled(self, key: str, now: float) -> float:
        bucket = self._buckets.get(key)
        if bucket is None:
            return self._burst
        tokens, last = bucket
        return min(self._burst, tokens + max(0.0, now - last) * self._rate_per_s)

    def _store(self, key: str, tokens: float, now: float) -> None:
        self._buckets[key] = (tokens, now)
        self._buckets.move_to_end(key)
        while len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)


class FailureLimiter:
    """Failed attempts per key (a user name, an IP) with exponential back-off.

    A request-rate limit does not stop password guessing: each guess is slow
    (PBKDF2), so a guesser stays under any sane request rate. This counts
    failures only, and is checked *before* the expensive work, so a locked-out
    key costs the server nothing. After `max_failures` failures within
    `window_s` the key is locked for `base_lock_s`, doubling with each further
    failure up to `max_lock_s`; a success clears the key.
    """

    def __init__(self, max_failures: int, window_s: float, base_lock_s: float, max_lock_s: float,
                 clock: Callable[[], float] = time.monotonic, max_keys: int = 100_000) -> None:
        if max_failures < 1 or window_s <= 0 or base_lock_s <= 0 or max_lock_s < base_lock_s:
            raise ValueError("max_failures >= 1, window_s > 0, 0 < base_lock_s <= max_lock_s")
        self._max = max_failures
        self._window = window_s
        self._base = base_lock_s
        self._cap = max_lock_s
        self._clock = clock
        self._max_keys = max_keys
        # key -> (failures in the window, window start, locked until)
        self._state: OrderedDict[str, tuple[int, float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def check(self, *keys: str) -> None:
        """Raise `LimitError("limit.auth_failures")` if any key is locked now."""
        now = self._clock()
        with self._lock:
            waits = [until - now for k in keys if (st := self._state.get(k)) and (until := st[2]) > now]
        if waits:
            raise LimitError("limit.auth_failures", retry_after_s=max(waits))

    def failed(self, *keys: str) -> None:
        now = self._clock()
        with self._lock:
            for key in keys:
                count, start, until = self._state.get(key, (0, now, 0.0))
                if now - start > self._window and until <= now:
                    count, start = 0, now  # the window passed: old failures are forgiven
                count += 1
                if count >= self._max:
                    until = now + min(self._cap, self._base * 2 ** (count - self._max))
                self._state[key] = (count, start, until)
                self._state.move_to_end(key)
                while len(self._state) > self._max_keys:
                    self._state.popitem(last=False)

    def succeeded(self, *keys: str) -> None:
        with self._lock:
            for key in keys:
                self._state.pop(key, None)


class SessionSlot:
    """One held session place; release it exactly once (extra releases are no-ops)."""

    def __init__(self, owner: SessionSlots, client: str) -> None:
        self._owner = owner
        self.client = client
        self._released = False

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        """Give the place back; safe to call from every cleanup path."""
        if not self._released:
            self._released = True
            self._owner._release(self.client)

    def __enter__(self) -> SessionSlot:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


class SessionSlots:
    """Counts concurrent sessions per replica and per client.

    The total cap protects the replica; the per-client cap stops one client
    from holding all of it.
    """

    def __init__(self, max_total: int, max_per_client: int) -> None:
        if max_total < 1 or max_per_client < 1:
            raise ValueError("max_total and max_per_client must be >= 1")
        self._max_total = max_total
        self._max_per_client = max_per_client
        self._total = 0
        self._by_client: dict[str, int] = {}
        self._lock = threading.Lock()

    @property
    def in_use(self) -> int:
        """Sessions held on this replica right now."""
        return self._total

    def in_use_by(self, client: str) -> int:
        """Sessions `client` holds right now."""
        return self._by_client.get(client, 0)

    def acquire(self, client: str) -> SessionSlot:
        """Take a place for `client`, or raise `LimitError` saying which cap was hit."""
        with self._lock:
            if self._total >= self._max_total:
                raise LimitError("limit.sessions")
            held = self._by_client.get(client, 0)
            if held >= self._max_per_client:
                raise LimitError("limit.client_sessions")
            self._total += 1
            self._by_client[client] = held + 1
        return SessionSlot(self, client)

    def _release(self, client: str) -> None:
        with self._lock:
            self._total = max(0, self._total - 1)
            left = self._by_client.get(client, 0) - 1
            if left > 0:
                self._by_client[client] = left
            else:
                # Drop idle clients so the map stays as small as the live sessions.
                self._by_client.pop(client, None)


def check_size(n_bytes: int, limit: int, what: str) -> None:
    """Refuse a body or message over `limit` bytes before it is processed."""
    if n_bytes > limit:
        raise LimitError("limit.too_large", f"{what} is {n_bytes} bytes; the limit is {limit}")
