"""/metrics over days: the hub's sum of every ingress process's snapshot
never lets a counter fall when a replica or gateway goes away (Prometheus
reads a fall as a restart from zero and puts a false spike in `rate()`),
while the gone process's gauges (its open sockets) leave with it."""

from __future__ import annotations

import re
from types import SimpleNamespace

from actors.ingress.metrics import RETIRED_KEPT_APART, SNAPSHOT_MAX_AGE_S, IngressMetrics, SnapshotSum


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def sample(text: str, line: str) -> float | None:
    m = re.search(rf"^{re.escape(line)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def turn(first_audio_ms: float) -> SimpleNamespace:
    return SimpleNamespace(type="metrics", interrupted=False, served_by={}, first_audio_ms=first_audio_ms,
                           stt_final_ms=None, llm_first_token_ms=None, tts_first_audio_ms=None)


CONNECTIONS = 'voice_connections_total{protocol="xiaozhi"}'
ACTIVE = 'voice_active_sockets{protocol="xiaozhi"}'
TURNS = "voice_first_audio_seconds_count"


def test_a_gone_process_keeps_its_counts_and_not_its_gauges():
    clock = Clock()
    hub = SnapshotSum(clock)
    a, b = IngressMetrics(), IngressMetrics()
    a.connected("xiaozhi")
    a.connected("xiaozhi")
    a.observe(turn(800.0))
    b.connected("xiaozhi")
    b.refused("auth.bad_token")
    hub.put("replica-a", a.snapshot())
    hub.put("gateway-b", b.snapshot())
    text = hub.render()
    assert (sample(text, CONNECTIONS), sample(text, ACTIVE), sample(text, TURNS)) == (3, 3, 1)

    clock.t += SNAPSHOT_MAX_AGE_S - 10
    hub.put("gateway-b", b.snapshot())
    clock.t += 20  # replica-a has been silent past the age: gone (scaled down, replaced)
    text = hub.render()
    assert "processes reporting (replicas and device gateways): 1" in text
    assert sample(text, CONNECTIONS) == 3 and sample(text, TURNS) == 1  # its counts stay
    assert sample(text, 'voice_first_audio_seconds_bucket{le="1.0"}') == 1
    assert sample(text, ACTIVE) == 1  # its sockets do not
    assert sample(text, 'voice_refused_total{code="auth.bad_token"}') == 1

    a.connected("xiaozhi")  # it was only slow: its snapshot (counted from its start) replaces what it left
    hub.put("replica-a", a.snapshot())
    text = hub.render()
    assert (sample(text, CONNECTIONS), sample(text, ACTIVE)) == (4, 4)


def test_many_gone_processes_are_summed_in_bounded_memory():
    clock = Clock()
    hub = SnapshotSum(clock)
    n = RETIRED_KEPT_APART + 6
    for i in range(n):
        m = IngressMetrics()
        m.connected("xiaozhi")
        hub.put(f"replica-{i}", m.snapshot())
    clock.t += SNAPSHOT_MAX_AGE_S + 1
    text = hub.render()
    assert sample(text, CONNECTIONS) == n and sample(text, ACTIVE) is None  # no process left to have sockets
    assert len(hub._retired) == RETIRED_KEPT_APART  # the oldest six merged into one sum
    assert sample(hub.render(), CONNECTIONS) == n  # rendering again adds nothing
