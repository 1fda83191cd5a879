"""Connect churn: `python -m bench.churn [--resume] [--waves 4 --per-wave 100]` (issue 12).

What one connect costs the processes that live as long as the server: the
Serve proxy and ingress replica, the session directory, Ray's GCS, raylet
and dashboard agent. Clients connect (native hello), wait 50 ms and hang up,
four at a time, in waves; after each wave (and the orphan reaper's turn) it
prints each process kind's USS. With `--resume` every connect resumes one
session, so no new actor is made: the difference between the two runs is
what a new session actor costs, against what a socket costs.
The server is started as bench/run.py starts it (fixed-delay fakes).
"""

from __future__ import annotations

import argparse
import asyncio
import time

from bench.run import PORT
from bench.soak import census, memory_by_kind, server_config, start_ray

SHOWN = ("VoiceIngress", "ProxyActor", "SessionDirectory", "ServeController", "gcs_server", "raylet",
         "DashboardAgent")


def long_lived_uss() -> dict[str, float]:
    """USS (MB) per long-lived process kind; session actors are left out."""
    out: dict[str, float] = {}
    for kind, m in memory_by_kind().items():
        short = kind.split(":")[-1]
        if short in SHOWN:
            out[short] = round(m["uss_mb"], 1)
    return out


async def churn(opts: argparse.Namespace) -> None:
    import ray
    from ray import serve

    from actors.client import NativeClient
    from actors.ingress.auth import Authenticator
    from actors.pools import ensure_pools
    from actors.session_directory import directory_name
    from serve_app import build_app

    config = server_config("fake", 4, "voice-actors-churn", opts.orphan_timeout_s)
    start_ray(config.server.namespace)
    try:
        ensure_pools(config)
        serve.start(http_options={"host": "127.0.0.1", "port": opts.port})
        serve.run(build_app(config), name="voice-actors", route_prefix="/")
        url = f"ws://127.0.0.1:{opts.port}/ws/voice"
        token = Authenticator(config.auth).issue_token("churn")
        sid = None
        if opts.resume:
            first = await NativeClient.connect(url, token)
            sid = first.session_id
            await first.close()

        async def one() -> None:
            c = await NativeClient.connect(url, token, session_id=sid)
            await asyncio.sleep(0.05)
            await c.close()

        await asyncio.sleep(5)
        start = long_lived_uss()
        print(f"[churn] {'resume' if opts.resume else 'new session'} per connect; USS MB after 0: {start}",
              flush=True)
        done = 0
        for _ in range(opts.waves):
            t0 = time.monotonic()
            for _ in range(opts.per_wave // 4):
                await asyncio.gather(*[one() for _ in range(4)])
            done += opts.per_wave
            await asyncio.sleep(opts.orphan_timeout_s + 2)  # the reaper ends the orphans of this wave
            now = long_lived_uss()
            per = {k: round((now[k] - start.get(k, now[k])) * 1024 / done, 1) for k in now}
            print(f"[churn] after {done} ({time.monotonic() - t0:.0f} s): USS MB {now}; KB per connect so far {per}",
                  flush=True)
            actors = await census(config.server.namespace)
            directory = await ray.get_actor(directory_name(), namespace=config.server.namespace).describe.remote()
            print(f"[churn] session actors alive {actors['session_actors']} (spare {actors['spares']}), "
                  f"SessionActors alive in the GCS {actors['session_actors_alive_in_gcs']}; directory {directory}",
                  flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--waves", type=int, default=4)
    p.add_argument("--per-wave", type=int, default=100, help="connects per wave (a multiple of 4)")
    p.add_argument("--resume", action="store_true", help="every connect resumes one session (no new actors)")
    p.add_argument("--orphan-timeout-s", type=float, default=10.0)
    p.add_argument("--port", type=int, default=PORT + 30)
    asyncio.run(churn(p.parse_args(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
