"""How much of this node's CPU has been idle lately.

The warm pool's refill starts Ray workers, each ~1 s of a core, in the
background. On a node whose live sessions already use about a core of two,
such a boot saturates the node for a second or more and every turn that
overlaps it waits (docs/benchmarks.md, "The warm pool's refill waits for an
idle core": 32 devices' steady p99 2.48x the single session's with the
refill running, 1.20x with no boot). So the refill asks this first.

System-wide counters (psutil), so every process of the node counts, Ray's
daemons and the load a test client puts on the same machine included. In a
container that shares its host's CPUs the host's other load counts too:
that errs towards starting fewer workers, never more.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

import psutil

WINDOW_S = 1.0
"""Idle CPUs are averaged over windows this long: a second holds ~16 frames
of every streaming session."""
HORIZON_S = 5.0
"""The least idle window of this long counts: devices' turns come in waves
(speech, then the reply's wait, then its audio), and a boot started in a
lull lands on the next wave. Five seconds hold a whole turn."""


def busy_cpu_seconds() -> float:
    """CPU-seconds the node's CPUs have spent not idle since boot; time the
    hypervisor took (steal) counts as busy: it was not ours to use."""
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


class NodeCpu:
    """The node's idle CPUs in its busiest `window_s` of the last
    `horizon_s`, from samples taken by `sample()` (the warm pool's own
    thread, every half second), leaving out the windows in which the
    caller's own work ran (`own_work`): the pool's boot is not load it
    should wait for. Thread-safe."""

    def __init__(self, window_s: float = WINDOW_S, horizon_s: float = HORIZON_S, *,
                 read: Callable[[], float] = busy_cpu_seconds, capacity: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s, self.horizon_s = window_s, max(horizon_s, window_s)
        self.capacity = float(capacity if capacity is not None else psutil.cpu_count() or 1)
        self._read, self._clock = read, clock
        self._samples: deque[tuple[float, float, bool]] = deque()
        """(when, busy CPU-seconds, whether the caller's own work ran since the sample before)"""
        self._own_now = self._own_since_sample = False
        self._lock = threading.Lock()

    def own_work(self, running: bool) -> None:
        """The caller's own work (a worker it boots) started or ended: the
        windows it ran in do not count."""
        with self._lock:
            self._own_now = running
            self._own_since_sample = self._own_since_sample or running

    def sample(self) -> None:
        now, busy = self._clock(), self._read()
        with self._lock:
            self._samples.append((now, busy, self._own_since_sample))
            self._own_since_sample = self._own_now
            while len(self._samples) > 1 and self._samples[1][0] <= now - self.horizon_s:
                self._samples.popleft()

    def idle_cpus(self) -> float | None:
        """Idle CPUs in the busiest window sampled (each from one sample to
        the first at least `window_s` later) over the last `horizon_s`, those
        with the caller's own work left out; None until one such window has
        been sampled."""
        with self._lock:
            samples = list(self._samples)
        least: float | None = None
        for i, (t0, b0, _) in enumerate(samples):
            for t1, b1, own in samples[i + 1:]:
                if own:
                    break
                if t1 - t0 >= self.window_s:
                    idle = max(0.0, self.capacity - (b1 - b0) / (t1 - t0))
                    least = idle if least is None else min(least, idle)
                    break
        return least

    def has_room(self, cpus: float) -> bool:
        """Whether at least `cpus` CPUs (capped at 75 % of the node, so a
        one-core node still refills when quiet) were idle in every window
        sampled; False until a window is known. `cpus` <= 0: always."""
        if cpus <= 0:
            return True
        idle = self.idle_cpus()
        return idle is not None and idle >= min(cpus, 0.75 * self.capacity)
