"""Issue 12 item 9: an upgrade drains sockets with a goodbye the clients act on.

A redeploy of the app with a changed config (`serve.run` of the same app
name: Serve replaces the replica, as `serve deploy` of a new version does)
under a native client mid-reply and an idle xiaozhi device: the reply is cut
as a barge-in would cut it, each socket gets `goodbye` and close 1012, both
clients reconnect to the new replica and resume the same session actor (not
restarted) with its history. Plus the drain bookkeeping without Ray.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest
import ray
from websockets.exceptions import ConnectionClosed

from actors.client import (
    SERVICE_RESTART,
    NativeClient,
    ServerRestarting,
    XiaozhiClient,
    closed_for_restart,
    should_reconnect,
)
from actors.ingress.auth import Authenticator
from actors.ingress.drain import CLOSE_CODE, RETRY_AFTER_MS, Drain, ReplicaDrainWatch
from actors.protocols.native import NativeProtocol
from actors.protocols.xiaozhi import XiaozhiProtocol
from tests.conftest import INGRESS_PORT, hosted_session, run_ingress, served_config

APP = "voice-actors-drain"
BASE = f"http://127.0.0.1:{INGRESS_PORT}"
WS = f"ws://127.0.0.1:{INGRESS_PORT}"
DEVICE = "02:00:00:00:12:09"
LONG = "Tell me about the museum and its opening hours."


# ------------------------------------------------------------------ without Ray
class FakeConnection:
    def __init__(self) -> None:
        self.requests: list[tuple[float, int]] = []

    def request_drain(self, grace_s: float, retry_after_ms: int) -> None:
        self.requests.append((grace_s, retry_after_ms))


async def test_drain_asks_every_open_socket_once_and_turns_late_ones_away() -> None:
    drain = Drain(grace_s=3.0)
    a, b, gone = FakeConnection(), FakeConnection(), FakeConnection()
    for c in (a, b, gone):
        drain.add(c)
    drain.discard(gone)
    shutting_down = False
    watch = ReplicaDrainWatch(drain, flag=lambda: shutting_down, poll_s=0.01)
    watch.ensure_started()
    await asyncio.sleep(0.05)
    assert not drain.draining and a.requests == []  # no shutdown yet: nobody told
    shutting_down = True
    deadline = time.monotonic() + 2
    while not drain.draining and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert drain.draining
    assert drain.start() == 0  # idempotent: __del__ after the watch changes nothing
    for c in (a, b):
        [(grace, retry)] = c.requests
        assert grace == 3.0 and RETRY_AFTER_MS[0] <= retry <= RETRY_AFTER_MS[1]
    assert gone.requests == []
    late = FakeConnection()
    drain.add(late)  # registered while draining: told at once, with no grace
    assert late.requests and late.requests[0][0] == 0.0
    watch.stop()

    # the goodbye each protocol sends before close 1012, and what the client makes of it
    native = json.loads(NativeProtocol(32000).goodbye("s1", "server.restart", 700)[0])
    assert native == {"type": "goodbye", "session_id": "s1", "reason": "server.restart", "reconnect": True,
                      "retry_after_ms": 700}
    device = XiaozhiProtocol(1, 24000, 32000)
    device.hello_reply("s2", False, 24000)
    assert json.loads(device.goodbye("s2", "server.restart", 700)[0]) == {"session_id": "s2", "type": "goodbye"}
    assert CLOSE_CODE == SERVICE_RESTART == 1012
    assert should_reconnect(ServerRestarting(native)) and closed_for_restart(ServerRestarting(native))


# ------------------------------------------------------------------ through Serve
@pytest.fixture(scope="module")
def server_config(config):
    config = served_config(config, [DEVICE])
    # no grace, so the reply in flight is cut (the harder path: heard text kept, tts.stop first)
    server = config.server.model_copy(update={"drain_grace_s": 0.0})
    return config.model_copy(update={"server": server})


@pytest.fixture(scope="module")
def server(ray_cluster, server_config):
    yield from run_ingress(server_config, APP)


def replica_names() -> list[str]:
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith(f"SERVE_REPLICA::{APP}#"))


def session_actor(sid: str) -> Any:
    return hosted_session(sid)


async def read_until_closed(client: Any, timeout_s: float = 60) -> tuple[list[dict[str, Any]], ConnectionClosed]:
    """Every JSON message until the server closes the socket."""
    messages: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            data = await asyncio.wait_for(client.ws.recv(), max(0.1, deadline - time.monotonic()))
        except ConnectionClosed as e:
            return messages, e
        if isinstance(data, str):
            messages.append(json.loads(data))


async def test_redeploy_drains_with_goodbye_and_clients_resume_their_sessions(server, server_config):
    from ray import serve

    from serve_app import VoiceIngress

    token = Authenticator(server_config.auth).issue_token("drain")
    async with httpx.AsyncClient() as http:
        r = await http.post(f"{BASE}/xiaozhi/ota/", headers={"Device-Id": DEVICE, "Client-Id": DEVICE},
                            json={"application": {"version": "1.6.0"}})
    assert r.status_code == 200, r.text
    url, dev_token = r.json()["websocket"]["url"], r.json()["websocket"]["token"]

    native = await NativeClient.connect(f"{WS}/ws/voice", token)
    device = await XiaozhiClient.connect(url, dev_token, DEVICE, client_id=DEVICE)
    try:
        first = await native.ask_text("My name is Cleo.")
        assert first.reply and not first.errors
        sid, device_sid = native.session_id, device.session_id
        pids = {s: (await session_actor(s).stats.remote())["pid"] for s in (sid, device_sid)}
        [old_replica] = replica_names()

        # the upgrade: the same app, changed config → Serve replaces the replica. Without the surge
        # that build_app asks for, so the old replica drains at once, while the reply is surely
        # playing (with it, the drain waits for the new replica's start-up: its timing is Serve's)
        new_config = server_config.model_copy(update={
            "server": server_config.server.model_copy(update={"drain_grace_s": 0.1})})
        new_app = VoiceIngress.options(num_replicas=1, max_surge_percent=0).bind(new_config)
        redeploy: list[asyncio.Future[Any]] = []

        def upgrade_when_speaking(msg: dict[str, Any]) -> None:
            if msg.get("type") == "tts.start" and not redeploy:
                redeploy.append(asyncio.ensure_future(asyncio.to_thread(
                    serve.run, new_app, name=APP, route_prefix="/")))

        await native.send_text(LONG)
        cut = await native.receive_turn(upgrade_when_speaking, timeout_s=60)
        assert redeploy, "no reply started"
        # cut the barge-in way (no grace left): its tts.stop (interrupted), then its metrics
        assert cut.interrupted and cut.messages[-1]["type"] == "metrics", [m.get("type") for m in cut.messages]
        assert [m["reason"] for m in cut.messages if m["type"] == "tts.stop"] == ["interrupted"]
        cut_turn = cut.messages[-1]["turn_id"]
        native_tail, native_closed = await read_until_closed(native)
        device_tail, device_closed = await read_until_closed(device)

        assert [m["type"] for m in native_tail] == ["goodbye"], native_tail
        goodbye = native_tail[0]
        assert goodbye["reason"] == "server.restart" and goodbye["reconnect"] is True
        assert goodbye["session_id"] == sid and RETRY_AFTER_MS[0] <= goodbye["retry_after_ms"] <= RETRY_AFTER_MS[1]
        native.goodbye = goodbye  # read by hand above; reconnect() waits its retry_after_ms
        assert native_closed.rcvd is not None and native_closed.rcvd.code == 1012, native_closed
        assert native_closed.rcvd.reason == "server.restart"
        assert closed_for_restart(native_closed) and should_reconnect(native_closed)
        # the device: the firmware's goodbye shape, then the same close
        assert device_tail == [{"session_id": device_sid, "type": "goodbye"}], device_tail
        assert device_closed.rcvd is not None and device_closed.rcvd.code == 1012, device_closed

        started = time.monotonic()
        await native.reconnect(timeout_s=120)  # whichever replica serves next
        await device.reconnect(timeout_s=60)
        reconnected_s = time.monotonic() - started
        await asyncio.wait_for(redeploy[0], 120)
        deadline = time.monotonic() + 30  # the old replica exits once its last socket is gone
        while old_replica in replica_names() and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert replica_names() and old_replica not in replica_names()
        assert native.session_id == sid and native.hello["resumed"] is True and native.reconnects == 1
        assert device.session_id == device_sid and device.reconnects == 1
        # the very same session actors: a drain never ends a session
        for s, pid in pids.items():
            assert (await session_actor(s).stats.remote())["pid"] == pid
        history = await session_actor(sid).history.remote()
        assert any(m["role"] == "user" and m["content"] == LONG for m in history), history
        cut_reply = [m for m in history if m["role"] == "assistant" and m.get("interrupted")]
        assert cut_reply, history  # recorded as interrupted, with what had been heard
        turn = await native.ask_text("What is my name?")
        assert "Cleo" in turn.reply and not turn.errors, turn.reply
        assert turn.messages[-1]["turn_id"] > cut_turn
        print(f"both clients back on the new replica {reconnected_s:.1f} s after the close")
    finally:
        await native.close()
        await device.close()
