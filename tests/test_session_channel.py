"""The same-node data path between a socket and its session actor
(actors/session_channel.py), on real Ray and real session actors."""

from __future__ import annotations

import asyncio
import os
import stat
import tempfile
from pathlib import Path

import pytest
import ray
from ray.exceptions import RayActorError

from actors.private_dir import private_dir
from actors.session_channel import GRANT, HEAD, frame, read_frame
from actors.session_link import SessionLink
from actors.sessions import new_session_id, open_session

QUESTION = "What is twelve times seven?"


async def next_event(link: SessionLink, timeout: float = 30.0):
    return await asyncio.wait_for(link.__anext__(), timeout)


async def turn_events(link: SessionLink, turn: int) -> list:
    events = []
    while True:
        event = await next_event(link, 60)
        events.append(event)
        if event.type == "metrics" and event.turn_id == turn:
            return events


async def test_a_socket_on_the_same_node_talks_to_its_session_over_the_channel(ray_cluster, config):
    ref = await open_session(config, new_session_id())
    link = SessionLink(ref, speak=False)
    assert (await next_event(link)).type == "session.started"
    assert link.over_channel
    turn = await link.call("send_text", QUESTION)
    events = await turn_events(link, turn)
    reply = "".join(e.text for e in events if e.type == "llm.delta")
    assert "84" in reply, reply
    assert not [e for e in events if e.type == "tts.audio"]  # this listener's own output: text only
    # calls are answered in order, with the actor's answers
    history = await link.call("history")
    assert [m["content"] for m in history if m["role"] == "user"][-1] == QUESTION
    assert "84" in history[-1]["content"], history
    # a call that is not a socket's is refused, and the channel lives on
    with pytest.raises(ValueError, match="not a channel call"):
        await link.call("close")
    assert (await link.call("stats"))["closed"] is False
    link.close()
    await ref.close.remote()


async def test_the_ray_path_gives_the_same_answers(ray_cluster, config):
    """A session on another node is reached through Ray: the actor offers no
    channel to another node, and a link without one answers alike."""
    ref = await open_session(config, new_session_id())
    assert await ref.open_channel.remote("another-node", None, None) is None
    link = SessionLink(ref, speak=False, use_channel=False)
    assert (await next_event(link)).type == "session.started"
    assert not link.over_channel
    turn = await link.call("send_text", QUESTION)
    reply = "".join(e.text for e in await turn_events(link, turn) if e.type == "llm.delta")
    assert "84" in reply, reply
    link.close()
    await ref.close.remote()


async def test_a_channel_needs_its_one_time_secret(ray_cluster, config):
    ref = await open_session(config, new_session_id())
    path, token = await ref.open_channel.remote(ray.get_runtime_context().get_node_id(), None, None)
    info = os.stat(path)
    assert stat.S_ISSOCK(info.st_mode) and info.st_mode & 0o077 == 0
    assert os.stat(Path(path).parent).st_mode & 0o077 == 0

    async def connect(secret: bytes) -> bytes | None:
        """The first frame's kind the actor sends, None if it hangs up."""
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(frame(GRANT, secret))
        try:
            kind, _ = await asyncio.wait_for(read_frame(reader, 1 << 20), 10)
            return bytes([kind])
        except asyncio.IncompleteReadError:
            return None
        finally:
            writer.close()

    assert await connect(bytes(32)) is None  # a forged secret: hung up, nothing sent
    assert await connect(token) == b"E"  # the granted one: the session's events
    assert await connect(token) is None  # used once only
    await ref.close.remote()


async def test_an_oversized_frame_drops_the_channel_not_the_session(ray_cluster, config):
    ref = await open_session(config, new_session_id())
    path, token = await ref.open_channel.remote(ray.get_runtime_context().get_node_id(), None, None)
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(frame(GRANT, token))
    await read_frame(reader, 1 << 20)  # session.started
    writer.write(HEAD.pack(1 << 30, b"C"[0]))  # a call claiming 1 GiB
    await writer.drain()
    with pytest.raises(asyncio.IncompleteReadError):
        while True:
            await asyncio.wait_for(read_frame(reader, 1 << 20), 10)
    writer.close()
    assert (await ref.stats.remote())["closed"] is False
    await ref.close.remote()


async def test_a_dead_actor_fails_calls_and_the_stream_as_ray_would(ray_cluster, config):
    """The connection reopens a session on `RayActorError`: the channel's
    closing must raise it, on a call and on the stream."""
    ref = await open_session(config, new_session_id())
    link = SessionLink(ref, speak=False)
    assert (await next_event(link)).type == "session.started"
    assert link.over_channel
    ray.kill(ref.actor)
    with pytest.raises(RayActorError):
        while True:
            await next_event(link)
    with pytest.raises(RayActorError):
        await asyncio.wait_for(link.call("stats"), 10)
    link.close()


async def test_an_ended_session_refuses_the_channel_calls(ray_cluster, config):
    ref = await open_session(config, new_session_id())
    link = SessionLink(ref, speak=False)
    assert (await next_event(link)).type == "session.started"
    await ref.close.remote()
    closing = await next_event(link)
    assert closing.type == "error" and closing.code == "session.closed"
    with pytest.raises(StopAsyncIteration):
        await next_event(link)
    with pytest.raises(RayActorError):  # SessionMoved, or the actor exited
        await asyncio.wait_for(link.call("send_text", "hello?"), 10)
    link.close()


async def test_grants_not_shown_are_capped(monkeypatch, tmp_path):
    """A caller granted channels it never opens cannot grow the actor's
    table without bound: past the cap, the oldest grant lapses."""
    from actors.session_channel import MAX_GRANTS, ChannelHost

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    (tmp_path / f"voice-actors-{os.getuid()}").mkdir(mode=0o700)
    served = []

    async def handler(grant, channel):
        served.append(grant)
        await channel.end()

    host = ChannelHost(handler)
    offers = [await host.grant(i) for i in range(MAX_GRANTS + 5)]
    assert len(host._grants) == MAX_GRANTS

    async def show(offer) -> bool:
        reader, writer = await asyncio.open_unix_connection(offer[0])
        writer.write(frame(GRANT, offer[1]))
        try:
            await asyncio.wait_for(read_frame(reader, 1 << 20), 10)
            return True
        except asyncio.IncompleteReadError:
            return False
        finally:
            writer.close()

    assert not await show(offers[0])  # the oldest lapsed
    assert await show(offers[-1])
    assert served == [MAX_GRANTS + 4]


def test_no_channel_from_a_directory_others_can_enter(monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    shared = tmp_path / f"voice-actors-{os.getuid()}"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    assert private_dir("session channels") is None
    shared.chmod(0o700)
    assert private_dir("session channels") == shared
