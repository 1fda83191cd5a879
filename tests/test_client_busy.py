"""A server busy starting sessions refuses a socket before `hello` with
`limit.starting_sessions` and `retry_after_ms` (close 4503): the client
raises `ServerBusy` and `connect_patiently` comes back after the hint, while
a refusal (a bad token) is raised at once. Against a real WebSocket server on
127.0.0.1 that answers as the ingress does (actors/ingress/core.py); the
server side's cap is tested on real actors in tests/test_session_actor.py.
No Ray."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

import pytest
from websockets.asyncio.server import ServerConnection, serve

from actors.client import (
    NativeClient,
    ServerBusy,
    XiaozhiClient,
    connect_patiently,
    server_busy,
    should_reconnect,
)

HINT_MS = 150


class BusyServer:
    """Refuses the first `busy` hellos as a server whose new sessions queue
    is full, then answers hello; `refuse` answers every hello with a refusal."""

    def __init__(self, busy: int, refuse: bool = False) -> None:
        self.busy, self.refuse = busy, refuse
        self.hellos: list[float] = []

    async def handler(self, ws: ServerConnection) -> None:
        hello = json.loads(await ws.recv())
        self.hellos.append(time.monotonic())
        if self.refuse:
            await ws.send(json.dumps({"type": "error", "code": "auth.bad_token", "message": "bad token"}))
            await ws.close(4401, "auth.bad_token")
            return
        if len(self.hellos) <= self.busy:
            await ws.send(json.dumps({"type": "error", "code": "limit.starting_sessions",
                                      "message": "too many new sessions are starting; try again shortly",
                                      "retry_after_ms": HINT_MS}))
            await ws.close(4503, "limit.starting_sessions")
            return
        if hello.get("transport") == "websocket":  # a xiaozhi device
            reply = {"type": "hello", "transport": "websocket", "session_id": "s1",
                     "audio_params": {"format": "opus", "sample_rate": 24000, "channels": 1, "frame_duration": 60}}
        else:
            reply = {"type": "hello", "version": 1, "session_id": "s1", "resumed": False,
                     "audio_out": {"format": "pcm16", "sample_rate": 16000}}
        await ws.send(json.dumps(reply))
        await ws.wait_closed()


async def running(server: BusyServer) -> AsyncIterator[str]:
    async with serve(server.handler, "127.0.0.1", 0) as ws_server:
        port = next(iter(ws_server.sockets)).getsockname()[1]
        yield f"ws://127.0.0.1:{port}"


@pytest.fixture
async def busy_twice() -> AsyncIterator[tuple[BusyServer, str]]:
    server = BusyServer(busy=2)
    async for url in running(server):
        yield server, url


async def test_a_busy_refusal_is_server_busy_with_its_hint(busy_twice):
    _, url = busy_twice
    with pytest.raises(ServerBusy) as native:
        await NativeClient.connect(f"{url}/ws/voice", "token")
    with pytest.raises(ServerBusy) as device:
        await XiaozhiClient.connect(f"{url}/xiaozhi/v1/", "token", "02:00:00:00:00:01")
    for refused in (native.value, device.value):
        assert refused.reply["code"] == "limit.starting_sessions"
        assert refused.retry_after_s == HINT_MS / 1000 and should_reconnect(refused)


async def test_connect_patiently_comes_back_after_the_hint(busy_twice):
    server, url = busy_twice
    client = await connect_patiently(lambda: NativeClient.connect(f"{url}/ws/voice", "token"), timeout_s=10,
                                     retry=server_busy)
    try:
        assert client.session_id == "s1" and len(server.hellos) == 3
        gaps = [b - a for a, b in zip(server.hellos, server.hellos[1:])]
        assert all(gap >= 0.8 * HINT_MS / 1000 for gap in gaps)  # jittered ±20 %, never sooner
    finally:
        await client.close()


async def test_connect_patiently_raises_a_refusal_at_once():
    server = BusyServer(busy=0, refuse=True)
    async for url in running(server):
        with pytest.raises(ConnectionError) as refused:
            await connect_patiently(lambda: NativeClient.connect(f"{url}/ws/voice", "forged"), timeout_s=10)
        assert not isinstance(refused.value, ServerBusy) and "auth.bad_token" in str(refused.value)
        assert len(server.hellos) == 1


async def test_connect_patiently_gives_up_at_its_timeout():
    server = BusyServer(busy=1000)
    async for url in running(server):
        with pytest.raises(ServerBusy):
            await connect_patiently(lambda: NativeClient.connect(f"{url}/ws/voice", "token"), timeout_s=0.5)
        assert 2 <= len(server.hellos) <= 5  # tried again after the hint, then gave up


async def test_a_first_connect_to_a_wrong_address_fails_at_once():
    """`retry=server_busy` (the CLI's and the bench's first connect): only a
    busy server is waited for; nothing listening is an error now."""
    tries = 0

    async def nowhere() -> NativeClient:
        nonlocal tries
        tries += 1
        return await NativeClient.connect("ws://127.0.0.1:9/ws/voice", "token")

    with pytest.raises(OSError):
        await connect_patiently(nowhere, timeout_s=30, retry=server_busy)
    assert tries == 1
