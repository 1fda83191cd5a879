"""What Ray itself costs here: `python -m bench.ray_costs` (issue 13 item 1).

A session is a Ray actor and everything it hears or says crosses a process
boundary, so the density ceiling is set by two figures this prints, measured
on bare actors with nothing of ours in them: the CPU an idle actor burns
(Ray's own timers), and the CPU of one actor call and of one streamed item
on each side, then of the same frames over a plain asyncio socket between
the same two processes (what a data path beside Ray's calls would cost).
Divide the server's CPU per session by them to see how much of it is
messages (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import struct
from typing import Any

FRAME = b"\x00" * 1920
"""One 60 ms frame of 16 kHz PCM16, as the ingress sends a session."""


def cpu_s(process: Any) -> float:
    times = process.cpu_times()
    return times.user + times.system


async def measure(rate: float, seconds: float, idle_s: float) -> dict[str, float]:
    import psutil
    import ray

    @ray.remote(num_cpus=0)
    class Bare:
        async def pid(self) -> int:
            return os.getpid()

        async def push(self, frames: list[tuple[int, bytes]]) -> None:
            return None

        async def stream(self, n: int, every_s: float) -> Any:
            for _ in range(n):
                await asyncio.sleep(every_s)
                yield [FRAME]

        async def listen(self) -> int:
            """A plain asyncio TCP server in this actor, for the same frames
            without Ray's call path (4-byte length, then the payload; a
            payload starting with b"s" is answered with one frame)."""
            async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                while True:
                    size = struct.unpack(">I", await reader.readexactly(4))[0]
                    if (await reader.readexactly(size))[:1] == b"s":
                        writer.write(struct.pack(">I", len(FRAME)) + FRAME)

            self._server = await asyncio.start_server(serve, "127.0.0.1", 0)
            return self._server.sockets[0].getsockname()[1]

    actor = Bare.remote()
    callee = psutil.Process(await actor.pid.remote())
    caller = psutil.Process()
    await asyncio.sleep(2)  # past the worker's start
    before = cpu_s(callee)
    await asyncio.sleep(idle_s)
    idle = (cpu_s(callee) - before) / idle_s

    n = int(rate * seconds)
    c0, m0 = cpu_s(callee), cpu_s(caller)
    for i in range(n):
        await actor.push.remote([(i, FRAME)])
        await asyncio.sleep(1 / rate)
    call_callee, call_caller = (cpu_s(callee) - c0) / n, (cpu_s(caller) - m0) / n

    c0, m0 = cpu_s(callee), cpu_s(caller)
    async for ref in actor.stream.options(num_returns="streaming").remote(n, 1 / rate):
        await ref
    item_callee, item_caller = (cpu_s(callee) - c0) / n, (cpu_s(caller) - m0) / n
    reader, writer = await asyncio.open_connection("127.0.0.1", await actor.listen.remote())
    c0, m0 = cpu_s(callee), cpu_s(caller)
    for _ in range(n):
        writer.write(struct.pack(">I", len(FRAME) + 1) + b"f" + FRAME)
        await asyncio.sleep(1 / rate)
    socket_callee, socket_caller = (cpu_s(callee) - c0) / n, (cpu_s(caller) - m0) / n
    c0, m0 = cpu_s(callee), cpu_s(caller)
    for _ in range(n):  # an item the actor sends back, as an event would be
        writer.write(struct.pack(">I", 1) + b"s")
        await reader.readexactly(struct.unpack(">I", await reader.readexactly(4))[0])
        await asyncio.sleep(1 / rate)
    sitem_callee, sitem_caller = (cpu_s(callee) - c0) / n, (cpu_s(caller) - m0) / n
    writer.close()

    c0 = cpu_s(caller)
    for _ in range(n):  # the caller's loop alone, to take out of the caller figures
        await asyncio.sleep(1 / rate)
    loop_only = (cpu_s(caller) - c0) / n
    idle_per_message = idle / rate
    return {"idle_actor_pct_of_core": round(100 * idle, 2),
            "caller_loop_ms": round(1000 * loop_only, 3),
            "socket_frame_callee_ms": round(1000 * (socket_callee - idle_per_message), 3),
            "socket_frame_caller_ms": round(1000 * socket_caller, 3),
            "socket_item_callee_ms": round(1000 * (sitem_callee - idle_per_message), 3),
            "socket_item_caller_ms": round(1000 * sitem_caller, 3),
            "call_callee_ms": round(1000 * (call_callee - idle_per_message), 3),
            "call_caller_ms": round(1000 * call_caller, 3),
            "streamed_item_callee_ms": round(1000 * (item_callee - idle_per_message), 3),
            "streamed_item_caller_ms": round(1000 * item_caller, 3),
            "rate_per_s": rate}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rate", type=float, default=50.0, help="calls (and streamed items) a second")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--idle-s", type=float, default=10.0)
    opts = p.parse_args()
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        result = asyncio.run(measure(opts.rate, opts.seconds, opts.idle_s))
    finally:
        ray.shutdown()
    print(f"[ray-costs] an idle actor: {result['idle_actor_pct_of_core']}% of a core; one call with a 60 ms "
          f"frame: {result['call_callee_ms']} ms CPU in the actor (its idle share taken out), "
          f"{result['call_caller_ms']} ms in the caller; one streamed item: {result['streamed_item_callee_ms']} ms "
          f"in the actor, {result['streamed_item_caller_ms']} ms in the reader ({opts.rate:.0f} a second)")
    print(f"[ray-costs] the same over a plain asyncio socket to the actor: a frame {result['socket_frame_callee_ms']} "
          f"ms in the actor, {result['socket_frame_caller_ms']} ms in the sender; an item back "
          f"{result['socket_item_callee_ms']} ms in the actor, {result['socket_item_caller_ms']} ms in the reader "
          f"(the caller's loop alone, sleeping between messages: {result['caller_loop_ms']} ms a message)")


if __name__ == "__main__":
    main()
