"""Calls to a provider pool on the caller's node over a channel
(actors/pool_channel.py), on real Ray and real pool actors."""

from __future__ import annotations

import asyncio

import pytest
import ray

from actors.channel_client import ChannelClient
from actors.pool_channel import MAX_REPLY_BYTES
from actors.pools import PooledSTT, PooledTTS, get_pool, stt_provider
from actors.providers.base import ProviderError

SCRIPTED = "tests.fakes.scripted_stt:ScriptedSTT"


async def stats(pool) -> dict:
    return await pool.stats.remote()


async def test_a_caller_on_the_pools_node_calls_it_over_a_channel(ray_cluster, config):
    pool = get_pool("stt", SCRIPTED, config)
    before = await stats(pool)
    stt = PooledSTT(pool)
    slow = asyncio.ensure_future(stt.transcribe(b"slow-" + b"x" * 5))
    fast = await stt.transcribe(b"abc")
    assert fast == "heard 3 bytes" and not slow.done()  # answered by id, not in the order asked
    assert await slow == "heard 10 bytes"
    with pytest.raises(ProviderError) as e:
        await stt.transcribe(b"fail")
    assert e.value.code == "stt.failed"
    assert await stt.transcribe(b"after") == "heard 5 bytes"  # the channel outlives a failed call
    after = await stats(pool)
    assert after["channel_calls"] - before["channel_calls"] == 4
    assert after["calls"] - before["calls"] == 4 and after["failures"] - before["failures"] == 1
    assert after["channels_open"] == 1  # one socket for this loop, however many calls


async def test_the_ray_path_gives_the_same_answers(ray_cluster, config):
    pool = get_pool("stt", SCRIPTED, config)
    before = await stats(pool)
    stt = PooledSTT(pool, use_channel=False)
    assert await stt.transcribe(b"abc") == "heard 3 bytes"
    with pytest.raises(ProviderError) as e:
        await stt.transcribe(b"fail")
    assert e.value.code == "stt.failed"
    after = await stats(pool)
    assert after["calls"] - before["calls"] == 2 and after["channel_calls"] == before["channel_calls"]
    off = config.model_copy(update={"pools": config.pools.model_copy(update={"channel": False})})
    assert stt_provider(SCRIPTED, off)._use_channel is False and stt_provider(SCRIPTED, config)._use_channel


async def test_the_embedded_models_answer_over_the_channel(ray_cluster, config, speech):
    tts_pool, stt_pool = get_pool("tts", "local-piper", config), get_pool("stt", "local-whisper", config)
    segment = await PooledTTS(tts_pool).synthesize("Hello there.")
    assert segment.sample_rate > 0 and len(segment.pcm16) > segment.sample_rate // 4
    text = await PooledSTT(stt_pool).transcribe(speech("What is twelve times seven?"))
    assert "twelve" in text.lower() or "12" in text
    assert (await stats(tts_pool))["channel_calls"] >= 1 and (await stats(stt_pool))["channel_calls"] >= 1


async def test_a_pool_restarted_under_its_channel_is_called_again_after_the_restart(ray_cluster, config):
    pool = get_pool("stt", SCRIPTED, config)
    stt = PooledSTT(pool, lambda: get_pool("stt", SCRIPTED, config))
    assert await stt.transcribe(b"abc") == "heard 3 bytes"
    old_pid = (await stats(pool))["pid"]
    slow = asyncio.ensure_future(stt.transcribe(b"slow" + b"y" * 4))
    await asyncio.sleep(0.2)
    ray.kill(pool, no_restart=False)  # the process dies under the slow call; Ray restarts it
    assert await asyncio.wait_for(slow, 90) == "heard 8 bytes"  # retried once, on the new process
    now = await stats(pool)
    assert now["pid"] != old_pid and now["channel_calls"] == 1 and now["channels_open"] == 1


async def test_a_channel_calls_only_a_pools_work(ray_cluster, config):
    pool = get_pool("stt", SCRIPTED, config)
    path, token = await pool.open_channel.remote(ray.get_runtime_context().get_node_id())
    client = await ChannelClient.connect(path, token, max_frame=MAX_REPLY_BYTES)
    try:
        with pytest.raises(ValueError, match="not a pool channel call"):
            await client.call("stats")
        assert await client.call("transcribe", b"ok") == "heard 2 bytes"
    finally:
        client.close()
    assert await pool.open_channel.remote("f" * 56) is None  # a caller on another node goes through Ray


def _cap_channels(pool, limit: int) -> int:
    before, pool._max_channels = pool._max_channels, limit
    return before


async def test_past_its_channel_budget_a_pool_is_called_through_ray(ray_cluster, config):
    """One file a channel: a pool serving every session process of a big
    node must not run out of files, so past its budget callers use Ray."""
    pool = get_pool("stt", SCRIPTED, config)
    assert (await stats(pool))["channels_open"] >= 0
    budget = await pool.__ray_call__.remote(_cap_channels, 0)
    assert budget >= 256  # half the open-file limit, raised to its hard value
    try:
        before = await stats(pool)
        loop_result = await asyncio.get_running_loop().run_in_executor(
            None, lambda: asyncio.run(PooledSTT(pool).transcribe(b"abcd")))  # a new loop: no channel yet
        assert loop_result == "heard 4 bytes"
        after = await stats(pool)
        assert after["calls"] - before["calls"] == 1 and after["channel_calls"] == before["channel_calls"]
        assert await pool.open_channel.remote(ray.get_runtime_context().get_node_id()) is None
    finally:
        await pool.__ray_call__.remote(_cap_channels, budget)
