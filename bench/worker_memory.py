"""A session process's memory under interpreter settings: `python -m bench.worker_memory` (issue 13 item 5).

Each session is its own Ray worker, so its USS is Ray's worker plus what the
session imports; none of that can be shared between processes without a
fork server, which Ray does not have. What can change is how the worker's
Python holds it. This starts, in turn and `--rounds` times, a bare Ray actor
that imports what a session actor imports (numpy, `actors.session`) under
each setting, and prints its USS (after a collection and a heap trim, as a
session does when idle) and how long it took from creation to its first
answer (a cold start: what a burst of new devices waits for), and the
worker's own CPU time to then.

The node is started as the server starts its own (bytecode cached under
the private directory, no job `runtime_env`: bench/run.py
`prepare_node_environment`). "plain" is a session worker as shipped, with
no `runtime_env` of its own; the other settings reach the worker as
`runtime_env` `env_vars`, as `server.optimize_session_workers` does, and
so through Ray's setup shim (a second interpreter that imports all of Ray
first): their start and CPU figures include it. "cache empty" is the
optimised settings on a node whose first session worker is still to write
the `.opt-2.pyc` files (a fresh cache directory each round).

`--deferred-imports` compares plain session workers on a node whose
workers defer Ray's unused imports (as shipped, actors/deferred_imports.py)
with one whose host turned that off, a fresh node for each, alternated.

`--breakdown` says where a plain session worker's USS goes instead: a bare
Ray worker, then each layer a session adds, measured inside one process
while a second worker holds the same layers (so the shared libraries' pages
count as shared, as they are with many sessions on a node), then a live
session opened through the notebook API (in-session fixed-delay fakes)
after one spoken turn.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from actors.worker_env import DEFERRED_IMPORTS, DEFERRED_IMPORTS_ENV

PLAIN = "plain (as shipped)"
OPTIMISED = "optimised (server.optimize_session_workers)"


def _optimised() -> dict[str, str]:
    """A session actor's settings with `server.optimize_session_workers` on (actors/worker_env.py)."""
    from actors.config import AppConfig, ServerConfig
    from actors.worker_env import session_runtime_env

    env = session_runtime_env(AppConfig(server=ServerConfig(optimize_session_workers=True)))
    assert env is not None, "no private directory for the bytecode"
    return dict(env["env_vars"])


def _empty_cache() -> dict[str, str]:
    """The optimised settings on a node whose cache is not written yet: its
    first session worker compiles every module."""
    env = _optimised()
    empty = Path(env["PYTHONPYCACHEPREFIX"]).parent / f"bench-empty-{time.monotonic_ns()}"
    empty.mkdir(mode=0o700)
    env["PYTHONPYCACHEPREFIX"] = str(empty)
    return env


VARIANTS: dict[str, Callable[[], dict[str, str]]] = {
    PLAIN: dict,
    OPTIMISED: _optimised,
    "optimised, cache empty": _empty_cache,
    "optimised + PYTHONNODEBUGRANGES=1": lambda: {**_optimised(), "PYTHONNODEBUGRANGES": "1"},
    "optimised + MALLOC_ARENA_MAX=1": lambda: {**_optimised(), "MALLOC_ARENA_MAX": "1"},
    "PYTHONMALLOC=malloc": lambda: {"PYTHONMALLOC": "malloc"},
}
"""Each setting's worker environment variables, made anew each round."""


def released_uss_mb() -> float:
    """This process's USS once its cycles are collected and its heap trimmed
    (as a session does when idle)."""
    import psutil

    from actors.heap import release_memory

    release_memory()
    return psutil.Process().memory_full_info().uss / 2 ** 20


def import_session() -> None:
    import numpy  # noqa: F401

    import actors.session  # noqa: F401


def measure(rounds: int, variants: dict[str, Callable[[], dict[str, str]]] = VARIANTS) -> dict[str, dict[str, Any]]:
    import ray

    @ray.remote(num_cpus=0)
    class Probe:
        def __init__(self) -> None:
            import_session()

        def memory(self) -> tuple[float, bool, float]:
            import sys

            times = os.times()
            time.sleep(0.2)
            return released_uss_mb(), sys.dont_write_bytecode, times.user + times.system

    out: dict[str, dict[str, Any]] = {name: {"uss_mb": [], "start_s": [], "cpu_s": []} for name in variants}
    for _ in range(rounds):
        for name, env_vars in variants.items():
            t0 = time.perf_counter()
            variables = env_vars()
            actor = Probe.options(runtime_env={"env_vars": variables} if variables else None).remote()
            uss, no_bytecode, cpu_s = ray.get(actor.memory.remote())
            out[name]["start_s"].append(time.perf_counter() - t0 - 0.2)
            out[name]["cpu_s"].append(cpu_s)
            out[name]["uss_mb"].append(uss)
            out[name]["no_bytecode_written"] = no_bytecode
            ray.kill(actor)
            time.sleep(0.5)
    return out


LAYERS = ("a bare Ray worker", "+ Ray's serialization context", "+ numpy", "+ actors.config",
          "+ actors.session", "+ Silero's weights")
"""What a session worker loads, in order. Ray builds its serialization context
on a worker's first argument, and that imports pydantic 2 in every worker
(and, but for a session's `lean_serialization_context`, pydantic's v1
package and starlette: `--full-context` measures that); numpy comes with
the first audio (the VAD); Silero's weights are mapped from a file every
session process of the node maps (actors/providers/local/shared_arrays.py)."""


def layer_breakdown(rounds: int, full_context: bool = False) -> tuple[dict[str, list[float]], list[float]]:
    """USS (MB) after each of `LAYERS`, per round; and a live session actor's.
    `full_context`: Ray's serialization context as any other worker builds it."""
    import asyncio

    import ray

    @ray.remote(num_cpus=0)
    class Layers:
        def add_each(self) -> list[float]:  # no argument: it would build the serialization context first
            import ray._private.worker

            def silero() -> None:
                import numpy as np

                from actors.providers.local.silero_numpy import WINDOW, SileroNumpy

                self.silero = SileroNumpy()
                self.silero.process(np.zeros(WINDOW, dtype=np.float32))

            from actors.worker_env import lean_serialization_context

            context = (ray._private.worker.global_worker.get_serialization_context if full_context
                       else lean_serialization_context)
            steps = [lambda: None, context,
                     lambda: __import__("numpy"), lambda: __import__("actors.config"),
                     lambda: __import__("actors.session"), silero]
            out = []
            for step in steps:
                step()
                out.append(released_uss_mb())
            return out

    keeper = Layers.remote()
    ray.get(keeper.add_each.remote())
    layers: dict[str, list[float]] = {name: [] for name in LAYERS}
    for _ in range(rounds):
        actor = Layers.remote()
        for name, uss in zip(LAYERS, ray.get(actor.add_each.remote())):
            layers[name].append(uss)
        ray.kill(actor)
    return layers, asyncio.run(_live_sessions(rounds))


async def _live_sessions(n: int) -> list[float]:
    """Each of `n` sessions' actor USS (MB) after one spoken turn."""
    from actors.config import AppConfig, STTConfig, TTSConfig
    from actors.notebook import SessionHandle
    from bench.run import QUESTION, speech_fixture

    config = AppConfig(stt=STTConfig(provider="bench.fakes:InSessionFixedDelaySTT"),
                       tts=TTSConfig(provider="bench.fakes:InSessionFixedDelayTTS"))
    speech = speech_fixture(QUESTION) + bytes(32000)  # a second of silence ends the turn
    sessions = [await SessionHandle.aopen(config=config) for _ in range(n)]
    for session in sessions:
        await session.aask_audio(speech)

    out = [await s.actor.actor.__ray_call__.remote(lambda actor: released_uss_mb()) for s in sessions]
    for session in sessions:
        await session.aclose()
    return out


DEFERRED = "Ray's unused imports deferred (as shipped)"
EAGER = "every import eager (VOICE_ACTORS_DEFERRED_IMPORTS='')"


def deferred_imports(rounds: int) -> dict[str, dict[str, Any]]:
    """Plain session workers on a node whose workers defer Ray's unused
    imports (actors/deferred_imports.py) and on one whose host turned that
    off, alternated, a fresh node each: the setting reaches workers only
    through the environment their raylet inherits."""
    import ray

    from bench.run import prepare_node_environment

    out: dict[str, dict[str, Any]] = {name: {"uss_mb": [], "start_s": [], "cpu_s": []} for name in (DEFERRED, EAGER)}
    for _ in range(rounds):
        for name in (DEFERRED, EAGER):
            os.environ[DEFERRED_IMPORTS_ENV] = "" if name == EAGER else DEFERRED_IMPORTS
            prepare_node_environment()
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            try:
                result = measure(4, {PLAIN: dict})[PLAIN]
            finally:
                ray.shutdown()
            for key in ("uss_mb", "start_s", "cpu_s"):
                out[name][key] += result[key]
            out[name]["no_bytecode_written"] = result["no_bytecode_written"]
    return out


def report(result: dict[str, dict[str, Any]], base_name: str) -> None:
    base = statistics.median(result[base_name]["uss_mb"])
    for name, r in result.items():
        uss = statistics.median(r["uss_mb"])
        print(f"[worker-memory] {name:24s} USS {uss:5.1f} MB ({uss - base:+.1f}; "
              f"{', '.join(f'{x:.1f}' for x in r['uss_mb'])}), creation → first answer "
              f"{statistics.median(r['start_s']):.2f} s, its CPU {statistics.median(r['cpu_s']):.2f} s "
              f"({', '.join(f'{x:.2f}' for x in sorted(r['cpu_s']))}); "
              f"bytecode not written: {r['no_bytecode_written']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="each setting this many times, alternated")
    p.add_argument("--breakdown", action="store_true", help="where a plain session worker's USS goes, layer by layer")
    p.add_argument("--full-context", action="store_true",
                   help="with --breakdown: Ray's serialization context as a worker other than a session's builds it")
    p.add_argument("--deferred-imports", action="store_true",
                   help="a plain session worker with and without Ray's unused imports deferred, 4 workers a node each round")
    opts = p.parse_args()
    if opts.breakdown:
        breakdown(opts.rounds, opts.full_context)
        return
    if opts.deferred_imports:
        report(deferred_imports(opts.rounds), DEFERRED)
        return
    import ray

    from bench.run import prepare_node_environment

    prepare_node_environment()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        result = measure(opts.rounds)
    finally:
        ray.shutdown()
    for empty in Path(_optimised()["PYTHONPYCACHEPREFIX"]).parent.glob("bench-empty-*"):
        shutil.rmtree(empty, ignore_errors=True)
    report(result, PLAIN)


def breakdown(rounds: int, full_context: bool = False) -> None:
    from actors.config import load_config
    from actors.runtime import connect_ray
    from bench.run import prepare_node_environment

    prepare_node_environment()
    connect_ray(load_config())  # as the server starts its node: the session directory and stores work
    import ray

    try:
        layers, live = layer_breakdown(rounds, full_context)
    finally:
        ray.shutdown()
    before = 0.0
    for name, values in layers.items():
        uss = statistics.median(values)
        print(f"[worker-memory] {name:32s} USS {uss:5.1f} MB ({uss - before:+.1f}; {', '.join(f'{x:.1f}' for x in values)})")
        before = uss
    print(f"[worker-memory] {'a live session, one spoken turn':32s} USS {statistics.median(live):5.1f} MB "
          f"({statistics.median(live) - before:+.1f}; {', '.join(f'{x:.1f}' for x in live)})")


if __name__ == "__main__":
    main()
