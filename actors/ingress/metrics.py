"""Prometheus metrics of the whole deployment, fed by the events each
ingress replica relays.

Latency histograms come from each turn's `metrics` event, so they measure
what the session measured: end of speech → first reply audio, and each
stage's share. Each replica keeps its own registry and sends a snapshot to
the `MetricsHub` actor every few seconds (and when asked for /metrics); the
hub sums the snapshots, so whichever replica answers /metrics, the figures
are the deployment's, not one replica's. Every sample here (counters,
gauges, histogram buckets, sums and counts) adds up across replicas; a
process that goes away keeps its counts in the sums, not its gauges
(`SnapshotSum`).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

import ray
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
RECENT_ERRORS = 200
"""Error events (and refusals) this replica keeps for the control panel."""
RECENT_LATENCIES = 2000
"""Turn latencies per stage this replica keeps (with their times) for the panel's percentiles."""
ERROR_MESSAGE_MAX = 300


class IngressMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._connections = Counter("voice_connections", "Sockets opened", ["protocol"], registry=r)
        self._active = Gauge("voice_active_sockets", "Sockets open now", ["protocol"], registry=r)
        self._refused = Counter("voice_refused", "Sockets or requests refused", ["code"], registry=r)
        self._hello_first = Counter("voice_hello_before_session",
                                    "Sockets told hello before their session's actor was up (none was ready)",
                                    ["protocol"], registry=r)
        self._errors = Counter("voice_session_errors", "Error events sent to clients", ["code"], registry=r)
        self._turns = Counter("voice_turns", "Turns finished", ["interrupted"], registry=r)
        self._served = Counter("voice_stage_served", "Turns each provider of a failover chain answered",
                               ["stage", "provider"], registry=r)
        self._latency = {
            name: Histogram(f"voice_{name}_seconds", help_, buckets=_BUCKETS, registry=r)
            for name, help_ in [
                ("first_audio", "End of user speech (or text in) to first reply audio"),
                ("stt_final", "End of speech to final transcript"),
                ("llm_first_token", "LLM request to first token"),
                ("tts_first_audio", "First sentence ready to its first audio"),
            ]
        }
        # the control panel's recent view (actors/ingress/admin.py): bounded, this replica's only
        self.recent_errors: deque[dict[str, Any]] = deque(maxlen=RECENT_ERRORS)
        """{ts, kind, code, message, session_id, turn_id}: error codes and their messages, never user text."""
        self.recent_latency: dict[str, deque[tuple[float, float]]] = {
            name: deque(maxlen=RECENT_LATENCIES) for name in self._latency}
        """Stage → (wall time, ms) of the latest turns."""

    def connected(self, protocol: str) -> None:
        self._connections.labels(protocol).inc()
        self._active.labels(protocol).inc()

    def disconnected(self, protocol: str) -> None:
        self._active.labels(protocol).dec()

    def hello_before_session(self, protocol: str) -> None:
        """A socket whose session needed a new actor: many mean the warm pool is too small for the bursts."""
        self._hello_first.labels(protocol).inc()

    def refused(self, code: str) -> None:
        self._refused.labels(code).inc()
        self.recent_errors.append({"ts": time.time(), "kind": "refused", "code": str(code), "message": None,
                                   "session_id": None, "turn_id": None})

    def observe(self, event: Any) -> None:
        if event.type == "error":
            self._errors.labels(str(event.code)).inc()
            message = event.message if isinstance(event.message, str) else None
            self.recent_errors.append({
                "ts": time.time(), "kind": "session", "code": str(event.code),
                "message": message[:ERROR_MESSAGE_MAX] if message is not None else None,
                "session_id": getattr(event, "session_id", None), "turn_id": getattr(event, "turn_id", None)})
        elif event.type == "metrics":
            self._turns.labels(str(event.interrupted).lower()).inc()
            for stage, provider in (event.served_by or {}).items():
                self._served.labels(stage, provider).inc()
            for name, hist in self._latency.items():
                value = getattr(event, f"{name}_ms", None)
                if value is not None:
                    hist.observe(value / 1000.0)
                    self.recent_latency[name].append((time.time(), float(value)))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def snapshot(self) -> list[Family]:
        """This replica's samples, as plain data for the hub."""
        families = []
        for metric in self.registry.collect():
            samples = [(s.name, tuple(sorted(s.labels.items())), float(s.value)) for s in metric.samples
                       if not s.name.endswith("_created")]
            families.append((metric.name, metric.type, metric.documentation, samples))
        return families


Family = tuple[str, str, str, list[tuple[str, tuple[tuple[str, str], ...], float]]]
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
HUB_NAME = "metrics:hub"
SNAPSHOT_MAX_AGE_S = 300.0
"""A replica that stopped reporting (gone, or scaled down) is dropped after this."""
RETIRED_KEPT_APART = 64
"""Gone processes whose final counts are kept by process (one that reports
again replaces its own); older ones are merged into one sum."""
MONOTONIC_KINDS = ("counter", "histogram")


class SnapshotSum:
    """The latest snapshot of every ingress process, summed into one
    exposition. A process that stops reporting (a replica scaled down or
    replaced, a gateway retired) leaves its gauges, but its counters and
    histograms stay in the sums: Prometheus reads a counter that falls as a
    restart from zero, so dropping a gone replica's 6 connections put a false
    spike in every `rate()` five minutes after each redeploy."""

    def __init__(self, now: Callable[[], float] = time.monotonic) -> None:
        self._now = now
        self._snapshots: dict[str, tuple[float, list[Family]]] = {}
        self._retired: dict[str, list[Family]] = {}
        """Gone processes' counters and histograms, by process, newest last."""
        self._retired_merged: dict[str, tuple[str, str, Samples]] = {}
        """Older gone processes', summed: name → (kind, doc, samples)."""

    def put(self, process: str, families: list[Family]) -> None:
        self._retired.pop(process, None)  # it was slow, not gone: its snapshot counts from its start
        self._snapshots[process] = (self._now(), families)

    def render(self) -> str:
        self._retire_silent()
        meta: dict[str, tuple[str, str]] = {}
        totals: dict[str, Samples] = {}

        def add(name: str, kind: str, doc: str, samples: Any) -> None:
            meta.setdefault(name, (kind, doc))
            family = totals.setdefault(name, {})
            for sample, labels, value in samples:
                family[(sample, labels)] = family.get((sample, labels), 0.0) + value

        for families in [f for _, f in self._snapshots.values()] + list(self._retired.values()):
            for name, kind, doc, samples in families:
                add(name, kind, doc, samples)
        for name, (kind, doc, merged) in self._retired_merged.items():
            add(name, kind, doc, [(sample, labels, value) for (sample, labels), value in merged.items()])
        lines = [f"# voice-actors ingress processes reporting (replicas and device gateways): {len(self._snapshots)}"]
        for name in sorted(totals):
            kind, doc = meta[name]
            lines += [f"# HELP {name} {doc}", f"# TYPE {name} {kind}"]
            lines += [f"{sample}{_labels(labels)} {_number(value)}" for (sample, labels), value in totals[name].items()]
        return "\n".join(lines) + "\n"

    def _retire_silent(self) -> None:
        now = self._now()
        for process, (at, families) in list(self._snapshots.items()):
            if now - at >= SNAPSHOT_MAX_AGE_S:
                del self._snapshots[process]
                self._retired[process] = [f for f in families if f[1] in MONOTONIC_KINDS]
        while len(self._retired) > RETIRED_KEPT_APART:
            oldest = next(iter(self._retired))
            for name, kind, doc, samples in self._retired.pop(oldest):
                merged = self._retired_merged.setdefault(name, (kind, doc, {}))[2]
                for sample, labels, value in samples:
                    merged[(sample, labels)] = merged.get((sample, labels), 0.0) + value


@ray.remote(num_cpus=0, max_restarts=-1)
class MetricsHub(SnapshotSum):
    """The deployment's one `SnapshotSum`, named `HUB_NAME`; every ingress process pushes to it."""


def _labels(labels: tuple[tuple[str, str], ...]) -> str:
    if not labels:
        return ""
    escaped = (v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for _, v in labels)
    return "{" + ",".join(f'{k}="{v}"' for (k, _), v in zip(labels, escaped)) + "}"


def _number(value: float) -> str:
    return str(int(value)) if value.is_integer() else repr(value)
