"""Circuit breakers: stop waiting on a provider that keeps failing.

A provider in a 429 storm or an outage costs every caller a timeout or a
refused request before the chain moves on. After `failures` consecutive
failures its breaker opens and calls skip it; after `reset_s` one probe call
goes through (half open): success closes the breaker, failure opens it again.

Breakers live per process and per (stage, provider): every chain a process
builds for that provider shares one. A session actor hosts one session at a
time and starts each with none (`forget_breakers`), so each session learns of
an outage from its own calls, with its own thresholds; ingress replicas share
theirs across their sessions' HTTP turns. A cluster-wide breaker would put a
remote call before every provider call, which costs more than the few failed
calls it saves (DESIGN §3).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, Literal

State = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    """Closed → open after `failures` in a row → half open after `reset_s` →
    closed on one success. Thread safe: SDK callbacks may report from their
    own threads."""

    def __init__(self, name: str, failures: int = 3, reset_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self._threshold = failures
        self._reset_s = reset_s
        self._clock = clock
        self._lock = threading.Lock()
        self._state: State = "closed"
        self._consecutive = 0
        self._opened_at = 0.0
        self._probing = False
        self.opened = 0
        """How many times the breaker has opened (metrics)."""
        self.last_error: str | None = None

    @property
    def state(self) -> State:
        with self._lock:
            return self._current()

    def _current(self) -> State:
        if self._state == "open" and self._clock() - self._opened_at >= self._reset_s:
            self._state, self._probing = "half_open", False
        return self._state

    def allow(self) -> bool:
        """May a call go to this provider now? In half open, only one probe
        at a time: the rest keep skipping it until the probe reports."""
        with self._lock:
            state = self._current()
            if state == "closed":
                return True
            if state == "half_open" and not self._probing:
                self._probing = True
                return True
            return False

    def success(self) -> None:
        with self._lock:
            self._state, self._consecutive, self._probing = "closed", 0, False

    def failure(self, error: str = "") -> bool:
        """Record a failure; True when this one opened the breaker."""
        with self._lock:
            self.last_error = error or self.last_error
            self._consecutive += 1
            state = self._current()
            if state == "half_open" or (state == "closed" and self._consecutive >= self._threshold):
                self._state, self._opened_at, self._probing = "open", self._clock(), False
                self.opened += 1
                return True
            return False

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"state": self._current(), "consecutive_failures": self._consecutive,
                    "opened": self.opened, "last_error": self.last_error}


_breakers: dict[tuple[str, str], CircuitBreaker] = {}
_registry_lock = threading.Lock()


def breaker_for(kind: str, name: str, failures: int, reset_s: float) -> CircuitBreaker:
    """This process's breaker for (stage, provider), made on first use."""
    with _registry_lock:
        found = _breakers.get((kind, name))
        if found is None:
            found = _breakers[(kind, name)] = CircuitBreaker(f"{kind}:{name}", failures, reset_s)
        return found


def forget_breakers() -> None:
    """Start afresh: a session actor about to host its next session."""
    with _registry_lock:
        _breakers.clear()


def breaker_states() -> dict[str, dict[str, Any]]:
    """Every breaker this process holds, for metrics and health."""
    with _registry_lock:
        items = list(_breakers.items())
    return {f"{kind}:{name}": b.snapshot() for (kind, name), b in items}
