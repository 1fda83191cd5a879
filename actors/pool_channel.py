"""Calls to a provider pool on the caller's own node over a channel
(actors/session_channel.py) rather than a Ray call each way.

A turn with a pooled model (the embedded Whisper and piper, a plug-in that
holds a model) calls its pools on the critical path: the pause's decode,
then the first sentence's synthesis. Through Ray that was four of the six
or seven cross-process messages between the end of speech and the first
audio, ~3–5 ms each on a loaded node, and the server's own time stayed at
33–43 ms p50 where providers the session opens itself took 23 ms
(docs/benchmarks.md, "The server's own time with providers opened by the
session"). A session process (or ingress replica) asks each pool once,
through Ray, for a channel, and then calls it over the Unix socket; a pool
on another node, or one that cannot offer a channel, is called through
Ray as before. The answers are the same either way: the pool's result, its
own exception, or a `RayActorError` (`ChannelClosed`) when its process died,
which `actors/pools.py` already answers by waiting for the restart and
retrying once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import weakref
from typing import Any

import ray

from actors.channel_client import ChannelClient
from actors.session_channel import ActorChannel

log = logging.getLogger(__name__)

POOL_CALLS = frozenset({"transcribe", "synthesize"})
"""What a channel may call on a pool: its work, nothing that manages it."""
MAX_REPLY_BYTES = 64 << 20
"""The largest answer a caller reads (a long sentence's synthesis is a few MB)."""


def channel_budget() -> int:
    """How many channels a pool process may hold: one file each, for every
    session process on its node. Raises this process's soft limit on open
    files to its hard one (allowed without privileges; many hosts start at
    1,024) and keeps half of it for channels, the rest for the model's own
    files and Ray's sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 1 << 20, hard))
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return max(0, soft // 2)


async def serve_pool_channel(pool: Any, channel: ActorChannel) -> None:
    """Serve one granted channel on `pool` (a `ProviderPool`): each call runs
    as its own task, as Ray runs a pool's calls concurrently, and is
    answered when done; the pool's semaphore still caps how many run."""
    running: set[asyncio.Task[None]] = set()

    async def answer(call_id: int, method: str, args: tuple[Any, ...]) -> None:
        try:
            value = await getattr(pool, method)(*args)
        except Exception as e:
            reply = channel.reply(call_id, error=e)
        else:
            reply = channel.reply(call_id, value)
        with contextlib.suppress(ConnectionError):  # the caller left: nobody to answer
            await reply

    try:
        async for call_id, method, args in channel.calls(POOL_CALLS, "a pool channel call"):
            pool.channel_calls += 1
            task = asyncio.get_running_loop().create_task(answer(call_id, method, args))
            running.add(task)
            task.add_done_callback(running.discard)
    except Exception as e:  # a frame over the cap, one that does not unpickle: drop this channel, not the pool
        log.warning("pool channel dropped: %r", e)
    finally:
        for task in list(running):
            task.cancel()


_links: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, asyncio.Future[ChannelClient | None]]] = \
    weakref.WeakKeyDictionary()
"""Each event loop's channel to each pool actor (by actor id) once asked
for; None: call that pool through Ray (another node, or no channel
offered). By loop, because a socket belongs to the loop that opened it (a
session actor has one; a notebook may run several in turn)."""


async def _open(pool: Any) -> ChannelClient | None:
    try:
        open_channel = pool.open_channel
    except AttributeError:  # a pool started by an older release, still serving through an upgrade
        return None
    offer = await open_channel.remote(ray.get_runtime_context().get_node_id())
    if offer is None:
        return None
    path, token = offer
    try:
        return await ChannelClient.connect(path, token, max_frame=MAX_REPLY_BYTES)
    except OSError as e:  # not on this machine after all (containers): Ray works anywhere
        log.warning("pool channel %s unreachable (%r); using Ray calls", path, e)
        return None


async def call_pool(pool: Any, method: str, arg: Any, use_channel: bool = True) -> Any:
    """`pool.method(arg)`, over this process's channel to `pool` when it
    has (or can open) one, else through Ray. A channel whose pool process
    died raises `ChannelClosed` (a `RayActorError`) and is opened afresh on
    the next call, to the restarted process."""
    if not use_channel:
        return await getattr(pool, method).remote(arg)
    links = _links.setdefault(asyncio.get_running_loop(), {})
    key = pool._actor_id.hex()
    link = links.get(key)
    if link is None or (link.done() and (link.exception() is not None
                                         or (link.result() is not None and link.result().closed))):
        link = links[key] = asyncio.ensure_future(_open(pool))
    client = await asyncio.shield(link)
    if client is None:
        return await getattr(pool, method).remote(arg)
    return await client.call(method, arg)
