"""A session process's memory under interpreter settings: `python -m bench.worker_memory` (issue 13 item 5).

Each session is its own Ray worker, so its USS is Ray's worker plus what the
session imports; none of that can be shared between processes without a
fork server, which Ray does not have. What can change is how the worker's
Python holds it. This starts, in turn and `--rounds` times, a bare Ray actor
that imports what a session actor imports (numpy, `actors.session`) under
each setting, and prints its USS (after a collection and a heap trim, as a
session does when idle) and how long it took from creation to its first
answer (a cold start: what a burst of new devices waits for).

The settings reach the worker as `runtime_env` `env_vars`, as they would
for the session actors; `hook` imports in the worker's main thread at boot
(`worker_process_setup_hook`) instead of in the actor's constructor.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Any

ROOT = str(Path(__file__).resolve().parent.parent)
VARIANTS: dict[str, dict[str, Any]] = {
    "as shipped": {},
    "PYTHONNODEBUGRANGES=1": {"env_vars": {"PYTHONNODEBUGRANGES": "1"}},
    "PYTHONOPTIMIZE=2": {"env_vars": {"PYTHONOPTIMIZE": "2"}},
    "PYTHONMALLOC=malloc": {"env_vars": {"PYTHONMALLOC": "malloc"}},
    "MALLOC_ARENA_MAX=1": {"env_vars": {"MALLOC_ARENA_MAX": "1"}},
    "the three that help": {"env_vars": {"PYTHONNODEBUGRANGES": "1", "PYTHONOPTIMIZE": "2", "MALLOC_ARENA_MAX": "1"}},
    "imports at boot (hook)": {"worker_process_setup_hook": "bench.worker_memory.import_session"},
}


def import_session() -> None:
    import numpy  # noqa: F401

    import actors.session  # noqa: F401


def measure(rounds: int) -> dict[str, dict[str, list[float]]]:
    import ray

    @ray.remote(num_cpus=0)
    class Probe:
        def __init__(self) -> None:
            import_session()

        def memory(self) -> tuple[float, bool]:
            import sys

            import psutil

            from actors.heap import release_memory

            release_memory()
            time.sleep(0.2)
            return psutil.Process().memory_full_info().uss / 2 ** 20, sys.dont_write_bytecode

    out: dict[str, dict[str, list[float]]] = {name: {"uss_mb": [], "start_s": []} for name in VARIANTS}
    for _ in range(rounds):
        for name, extra in VARIANTS.items():
            env = {"env_vars": {"PYTHONPATH": ROOT, **extra.get("env_vars", {})}}
            env.update({k: v for k, v in extra.items() if k != "env_vars"})
            t0 = time.perf_counter()
            actor = Probe.options(runtime_env=env).remote()
            uss, no_bytecode = ray.get(actor.memory.remote())
            out[name]["start_s"].append(time.perf_counter() - t0 - 0.2)
            out[name]["uss_mb"].append(uss)
            out[name]["no_bytecode_written"] = [no_bytecode]
            ray.kill(actor)
            time.sleep(0.5)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="each setting this many times, alternated")
    opts = p.parse_args()
    import ray

    os.environ["PYTHONPATH"] = ROOT
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": ROOT}})
    try:
        result = measure(opts.rounds)
    finally:
        ray.shutdown()
    base = statistics.median(result["as shipped"]["uss_mb"])
    for name, r in result.items():
        uss = statistics.median(r["uss_mb"])
        print(f"[worker-memory] {name:24s} USS {uss:5.1f} MB ({uss - base:+.1f}; "
              f"{', '.join(f'{x:.1f}' for x in r['uss_mb'])}), creation → first answer "
              f"{statistics.median(r['start_s']):.2f} s; bytecode not written: {bool(r['no_bytecode_written'][0])}")


if __name__ == "__main__":
    main()
