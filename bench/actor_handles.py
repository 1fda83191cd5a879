"""What a long-lived actor keeps for each actor it has talked to:
`python -m bench.actor_handles --actors 600`.

The device gateway lives for days and, over them, receives the handle of
every session actor its devices were given. Ray's core worker keeps a
record of every actor handle a worker process has seen (ray-project/ray
#6370: cleaned up only when a non-actor task ends, which never happens in
an actor), so such a process grows with the number of distinct actors it
talked to, not with what it holds. This measures that growth alone: a
holder actor is handed, 20 at a time, handles of short-lived actors, calls
each once, and they are killed; its USS (after a collection and a heap
trim) is printed every 100.
"""

from __future__ import annotations

import argparse
import os
import time

import ray


@ray.remote(num_cpus=0)
class ShortLived:
    def ping(self) -> int:
        return os.getpid()


@ray.remote(num_cpus=0)
class Holder:
    def uss_mb(self) -> float:
        import psutil

        from actors.heap import release_memory

        release_memory()
        return psutil.Process().memory_full_info().uss / 2 ** 20

    def talk(self, handles: list[list[ray.actor.ActorHandle]]) -> int:
        return len(ray.get([h[0].ping.remote() for h in handles]))  # wrapped: passed as handles, not resolved


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--actors", type=int, default=600, help="short-lived actors in all (a multiple of 100)")
    opts = p.parse_args()
    from bench.run import prepare_node_environment

    prepare_node_environment()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    holder = Holder.remote()
    figures = [(0, ray.get(holder.uss_mb.remote()))]
    for done in range(20, opts.actors + 1, 20):
        batch = [ShortLived.remote() for _ in range(20)]
        ray.get(holder.talk.remote([[actor] for actor in batch]))
        for actor in batch:
            ray.kill(actor)
        if done % 100 == 0:
            time.sleep(1.0)
            figures.append((done, ray.get(holder.uss_mb.remote())))
            print(f"[actor-handles] after {done:5d} actors: holder USS {figures[-1][1]:.1f} MB", flush=True)
    ray.shutdown()
    (n0, m0), (n1, m1) = figures[1], figures[-1]
    if n1 > n0:
        print(f"[actor-handles] past the first 100: {(m1 - m0) * 1024 / (n1 - n0):.1f} KB a further actor")


if __name__ == "__main__":
    main()
