"""Prometheus metrics of one ingress replica, fed by the events it relays.

Latency histograms come from each turn's `metrics` event, so they measure
what the session measured: end of speech → first reply audio, and each
stage's share.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)


class IngressMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._connections = Counter("voice_connections", "Sockets opened", ["protocol"], registry=r)
        self._active = Gauge("voice_active_sockets", "Sockets open now", ["protocol"], registry=r)
        self._refused = Counter("voice_refused", "Sockets or requests refused", ["code"], registry=r)
        self._errors = Counter("voice_session_errors", "Error events sent to clients", ["code"], registry=r)
        self._turns = Counter("voice_turns", "Turns finished", ["interrupted"], registry=r)
        self._latency = {
            name: Histogram(f"voice_{name}_seconds", help_, buckets=_BUCKETS, registry=r)
            for name, help_ in [
                ("first_audio", "End of user speech (or text in) to first reply audio"),
                ("stt_final", "End of speech to final transcript"),
                ("llm_first_token", "LLM request to first token"),
                ("tts_first_audio", "First sentence ready to its first audio"),
            ]
        }

    def connected(self, protocol: str) -> None:
        self._connections.labels(protocol).inc()
        self._active.labels(protocol).inc()

    def disconnected(self, protocol: str) -> None:
        self._active.labels(protocol).dec()

    def refused(self, code: str) -> None:
        self._refused.labels(code).inc()

    def observe(self, event: Any) -> None:
        if event.type == "error":
            self._errors.labels(str(event.code)).inc()
        elif event.type == "metrics":
            self._turns.labels(str(event.interrupted).lower()).inc()
            for name, hist in self._latency.items():
                value = getattr(event, f"{name}_ms", None)
                if value is not None:
                    hist.observe(value / 1000.0)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
