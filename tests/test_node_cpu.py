"""The node's idle CPUs, as the warm pool's refill reads them before it
starts a worker (actors/node_cpu.py)."""

from __future__ import annotations

import threading
import time

import psutil

from actors.node_cpu import NodeCpu


class Counters:
    """A node's clock and busy CPU-seconds, moved by the test."""

    def __init__(self) -> None:
        self.now = 100.0
        self.busy = 5000.0

    def run(self, seconds: float, busy_cpus: float) -> None:
        self.now += seconds
        self.busy += seconds * busy_cpus


def sampled(counters: Counters, capacity: float = 2.0) -> NodeCpu:
    return NodeCpu(1.0, 5.0, read=lambda: counters.busy, capacity=capacity, clock=lambda: counters.now)


def run_sampled(cpu: NodeCpu, counters: Counters, seconds: float, busy_cpus: float) -> None:
    """`seconds` of load, sampled every half second as the warm pool's thread does."""
    for _ in range(round(seconds / 0.5)):
        counters.run(0.5, busy_cpus)
        cpu.sample()


def test_the_busiest_second_of_the_last_five_counts_and_nothing_before_a_second_is_sampled():
    counters = Counters()
    cpu = sampled(counters)
    assert cpu.idle_cpus() is None and not cpu.has_room(1.0)
    cpu.sample()
    run_sampled(cpu, counters, 0.5, busy_cpus=0.5)
    assert cpu.idle_cpus() is None  # half a window sampled
    run_sampled(cpu, counters, 0.5, busy_cpus=1.5)
    assert abs(cpu.idle_cpus() - 1.0) < 1e-9  # 2 CPUs, 1 busy on average over the second
    # a wave of load a few seconds ago still counts: the next wave is as likely
    run_sampled(cpu, counters, 60, busy_cpus=0.2)
    run_sampled(cpu, counters, 1, busy_cpus=1.6)
    run_sampled(cpu, counters, 3, busy_cpus=0.2)
    assert abs(cpu.idle_cpus() - 0.4) < 1e-9 and not cpu.has_room(1.25)
    # five seconds on, it has left the horizon
    run_sampled(cpu, counters, 2, busy_cpus=0.2)
    assert abs(cpu.idle_cpus() - 1.8) < 1e-9 and cpu.has_room(1.25)
    assert len(cpu._samples) <= 11


def test_the_callers_own_boot_is_left_out_and_the_windows_around_it_count():
    counters = Counters()
    cpu = sampled(counters)
    cpu.sample()
    run_sampled(cpu, counters, 3, busy_cpus=0.2)
    cpu.own_work(True)
    run_sampled(cpu, counters, 1.5, busy_cpus=1.2)  # the worker the pool booted
    cpu.own_work(False)
    assert abs(cpu.idle_cpus() - 1.8) < 1e-9 and cpu.has_room(1.25)  # the quiet windows before it
    run_sampled(cpu, counters, 0.5, busy_cpus=0.2)
    # the half second the boot ended in is left out too: its tail ran there
    assert abs(cpu.idle_cpus() - 1.8) < 1e-9
    run_sampled(cpu, counters, 1, busy_cpus=1.0)  # live load after it counts
    assert abs(cpu.idle_cpus() - 1.0) < 1e-9 and not cpu.has_room(1.25)
    # a boot longer than the horizon leaves no window: unknown until one after it
    cpu.own_work(True)
    run_sampled(cpu, counters, 6, busy_cpus=1.0)
    cpu.own_work(False)
    run_sampled(cpu, counters, 0.5, busy_cpus=0.2)
    assert cpu.idle_cpus() is None
    run_sampled(cpu, counters, 1, busy_cpus=0.2)
    assert abs(cpu.idle_cpus() - 1.8) < 1e-9


def test_room_for_a_boot_needs_the_idle_cpus_asked_for_at_most_60_percent_of_the_node():
    counters = Counters()
    two = sampled(counters)
    two.sample()
    run_sampled(two, counters, 1, busy_cpus=1.0)
    assert not two.has_room(1.25) and two.has_room(1.0) and two.has_room(0.0)
    one_core = Counters()
    single = sampled(one_core, capacity=1.0)
    single.sample()
    run_sampled(single, one_core, 1.5, busy_cpus=0.2)
    # asking 1.25 of one core can never be met: a quiet one-core node (0.8 idle) still refills
    assert single.has_room(1.25)
    run_sampled(single, one_core, 1, busy_cpus=0.3)
    assert not single.has_room(1.25)  # 0.7 idle: under 75 % of the node
    assert not two.has_room(1.6) and two.has_room(0.9)


def test_this_nodes_counters_show_a_busy_thread():
    """The real counters: a thread spinning for a window shows as at least
    most of its own CPU time busy on the node (anything else running only
    adds to it)."""
    cpu = NodeCpu(window_s=1.0, horizon_s=5.0)
    stop = time.monotonic() + 1.2
    spun: list[float] = []

    def spin() -> None:
        start = time.thread_time()
        while time.monotonic() < stop:
            pass
        spun.append(time.thread_time() - start)

    cpu.sample()
    thread = threading.Thread(target=spin)
    thread.start()
    thread.join()
    cpu.sample()
    idle = cpu.idle_cpus()
    assert idle is not None and cpu.capacity == psutil.cpu_count()
    busy = cpu.capacity - idle
    assert busy >= 0.9 * spun[0] / 1.2 - 0.05, (busy, spun)
