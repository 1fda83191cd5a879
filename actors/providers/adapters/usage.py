"""Per-process counters of each provider's calls, as its failover chain makes
them: calls, calls in flight, failures and call durations.

They sit beside the circuit breakers (breaker.py) and for the same reason
live per process and per (stage, provider): a session actor is one process,
so its counters are that session's, and the control panel (actors/ingress/
admin.py) adds them up over the live sessions. A pooled embedded model has
its own figures in its pool; these are what the session saw, cloud providers
and fallbacks included, which is the only place a cloud provider's load and
health can be seen at all.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

from actors.providers.adapters.breaker import breaker_states, forget_breakers

LATENCY_WINDOW = 128
"""Calls whose durations are kept for the percentiles."""


class ProviderUsage:
    """One provider's counters in this process. A call is an attempt a chain
    handed out: a request, or a stream until it ended (an STT stream spans
    its utterance, an LLM stream its reply)."""

    def __init__(self, window: int = LATENCY_WINDOW) -> None:
        self._lock = threading.Lock()
        self.calls = 0
        self.in_flight = 0
        self.failures = 0
        self._durations_ms: deque[float] = deque(maxlen=window)
        self._total_ms = 0.0
        self._ended = 0

    def begin(self) -> float:
        with self._lock:
            self.calls += 1
            self.in_flight += 1
        return time.perf_counter()

    def end(self, started: float) -> None:
        took_ms = (time.perf_counter() - started) * 1000.0
        with self._lock:
            self.in_flight -= 1
            self._durations_ms.append(took_ms)
            self._total_ms += took_ms
            self._ended += 1

    def failure(self) -> None:
        with self._lock:
            self.failures += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            recent = sorted(self._durations_ms)
            mean = self._total_ms / self._ended if self._ended else None
            calls, in_flight, failures, ended = self.calls, self.in_flight, self.failures, self._ended

        def pct(q: float) -> float | None:
            return round(recent[min(len(recent) - 1, int(q * len(recent)))], 1) if recent else None

        return {"calls": calls, "in_flight": in_flight, "failures": failures,
                "latency_ms": {"mean": round(mean, 1) if mean is not None else None, "p50": pct(0.5),
                               "p95": pct(0.95), "n": ended}}


_usage: dict[tuple[str, str], ProviderUsage] = {}
_registry_lock = threading.Lock()


def usage_for(kind: str, name: str) -> ProviderUsage:
    """This process's counters for (stage, provider), made on first use."""
    with _registry_lock:
        found = _usage.get((kind, name))
        if found is None:
            found = _usage[(kind, name)] = ProviderUsage()
        return found


def forget_provider_state() -> None:
    """This process's breakers and counters start afresh: a session actor
    hosts its next session with the figures of that session alone."""
    forget_breakers()
    with _registry_lock:
        _usage.clear()


def provider_report() -> dict[str, dict[str, Any]]:
    """Every provider this process has a breaker or counters for, as
    `{"<stage>:<provider>": {state, consecutive_failures, opened, last_error,
    calls, in_flight, failures, latency_ms}}` (a session's `stats()`)."""
    with _registry_lock:
        usage = {f"{kind}:{name}": u.snapshot() for (kind, name), u in list(_usage.items())}
    report: dict[str, dict[str, Any]] = {}
    for name, breaker in breaker_states().items():
        report[name] = {**breaker, **usage.pop(name, ProviderUsage().snapshot())}
    for name, counters in usage.items():  # counters without a breaker: not made by a chain
        report[name] = {"state": None, **counters}
    return report
