"""Issue 13: device sockets through the per-node gateway, not the Serve proxy.

The OTA (through Serve, or on the gateway's own port) hands a device the
gateway's URL, and the device does all it did through Serve: hello, a spoken
turn answered with speech, its session kept across reconnects, refused
without a valid token. A redeploy
with a new config replaces the gateway: its device hears `goodbye` and close
1012, reconnects to the new one on the same port and resumes its session.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from typing import Any

import httpx
import pytest
import ray
from pydantic import SecretStr
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from actors.audio import rms_dbfs, silence
from actors.client import NativeClient, XiaozhiClient
from actors.ingress.auth import Authenticator
from actors.ingress.gateway import NAME_PREFIX, GatewayLease
from actors.ingress.metrics import HUB_NAME
from actors.sessions import find_session
from tests.conftest import INGRESS_PORT, run_ingress, served_config

APP = "voice-actors-gateway"
BASE = f"http://127.0.0.1:{INGRESS_PORT}"
DEVICES = ["02:00:00:00:13:01", "02:00:00:00:13:02", "02:00:00:00:13:03"]
QUESTION = "What is twelve times seven?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


GATEWAY_PORT = free_port()
READ_S = 3.0
"""limits.request_read_s here: a connection's time to deliver its request."""


@pytest.fixture(scope="module")
def server_config(config):
    config = served_config(config, DEVICES)
    ingress = config.ingress.model_copy(update={"gateway_port": GATEWAY_PORT})
    server = config.server.model_copy(update={"drain_grace_s": 0.0})
    limits = config.limits.model_copy(update={"request_read_s": READ_S, "pending_connections_per_address": 8})
    return config.model_copy(update={"ingress": ingress, "server": server, "limits": limits})


@pytest.fixture(scope="module")
def server(ray_cluster, server_config):
    yield from run_ingress(server_config, APP)
    for gateway in gateways():  # detached: it would otherwise wait out its lease
        ray.kill(ray.get_actor(gateway["name"], namespace=gateway["namespace"]))


async def _next_json(ws: Any, kind: str) -> dict[str, Any]:
    while True:
        data = await asyncio.wait_for(ws.recv(), 30)
        if isinstance(data, str) and (message := json.loads(data))["type"] == kind:
            return message


def gateways() -> list[dict[str, Any]]:
    return [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(NAME_PREFIX)]


async def ota(device_id: str) -> dict[str, str]:
    async with httpx.AsyncClient() as http:
        r = await http.post(f"{BASE}/xiaozhi/ota/", headers={"Device-Id": device_id, "Client-Id": device_id},
                            json={"application": {"version": "1.6.0"}})
    assert r.status_code == 200, r.text
    return r.json()["websocket"]


async def test_a_device_talks_through_the_gateway_and_keeps_its_session(server, server_config, speech):
    device = DEVICES[0]
    ws = await ota(device)
    assert ws["url"] == f"ws://127.0.0.1:{GATEWAY_PORT}/xiaozhi/v1/"  # not the Serve port
    assert len(gateways()) == 1
    async with httpx.AsyncClient() as http:  # the gateway keeps the node's warm pool for devices
        deadline = time.monotonic() + 60
        while (await http.get(f"{BASE}/health")).json()["checks"]["device_gateway"]["warm_sessions_ready"] < 1:
            assert time.monotonic() < deadline, "the gateway's warm pool never filled"
            await asyncio.sleep(0.5)
    async with await XiaozhiClient.connect(ws["url"], ws["token"], device, client_id=device) as c:
        first = c.session_id
        # the client offered permessage-deflate (as py-xiaozhi's does); the gateway declines it:
        # Opus does not compress, and each socket's zlib state outlived it until a full collection
        assert "Sec-WebSocket-Extensions" not in c.ws.response.headers
        turn = await c.ask_audio(silence(300) + speech(QUESTION), realtime=True)
    kinds = [(m["type"], m.get("state")) for m in turn.messages]
    assert kinds.index(("stt", None)) < kinds.index(("tts", "start")) < kinds.index(("tts", "sentence_start"))
    assert kinds[-1] == ("tts", "stop")
    assert "12" in turn.transcript and "84" in turn.reply
    assert len(turn.audio) / 48000 > 0.8 and rms_dbfs(turn.audio) > -35
    async with await XiaozhiClient.connect(ws["url"], ws["token"], device, client_id=device) as c:
        assert c.session_id == first  # a device keeps its session across connections, as through Serve
        # the gateway and the session actor share the node: its audio and events take the channel, not Ray
        session = await find_session(server_config, first)
        assert (await session.stats.remote())["channels_open"] == 1
        async with httpx.AsyncClient() as http:
            health = (await http.get(f"{BASE}/health")).json()
            gateway = health["checks"]["device_gateway"]
            assert gateway["ok"] and gateway["port"] == GATEWAY_PORT and gateway["sockets"] == 1
            # the gateway's sockets are in the deployment's metrics (it pushes to the hub as a replica
            # does). The hub is shared by every module's app in this test run and keeps a gone
            # replica's counts for minutes: started afresh, it holds only this app's processes'
            ray.kill(ray.get_actor(HUB_NAME, namespace=server_config.server.namespace), no_restart=False)
            wanted = ('voice_active_sockets{protocol="xiaozhi"} 1\n', 'voice_connections_total{protocol="xiaozhi"} 2\n')
            deadline, text = time.monotonic() + 30, ""
            while not all(w in text for w in wanted) and time.monotonic() < deadline:
                await asyncio.sleep(0.5)
                text = (await http.get(f"{BASE}/metrics")).text
            assert all(w in text for w in wanted), text
            # both took warm or live sessions (the first one's claim followed its hello): neither
            # counts as a hello before a new actor
            assert 'voice_hello_before_session_total{protocol="xiaozhi"}' not in text


async def test_the_gateway_refuses_what_the_serve_route_refuses(server, server_config):
    device, stranger = DEVICES[1], "0a:0b:0c:0d:0e:13"
    ws = await ota(device)
    url = ws["url"]
    signed_for_a_stranger = Authenticator(server_config.auth).issue_device_token(stranger, stranger)
    forged = Authenticator(server_config.auth.model_copy(update={"device_secret": SecretStr("x" * 40)})) \
        .issue_device_token(device, device)
    for headers, close in (({"Device-Id": device, "Client-Id": device}, (4401, "auth.missing_token")),
                           ({"Device-Id": device, "Client-Id": device, "Authorization": f"Bearer {forged}"},
                            (4401, "auth.bad_device_token")),
                           ({"Client-Id": device, "Authorization": f"Bearer {ws['token']}"},
                            (4400, "xiaozhi.missing_device_id")),
                           ({"Device-Id": DEVICES[0], "Client-Id": DEVICES[0], "Authorization": f"Bearer {ws['token']}"},
                            (4401, "auth.bad_device_token")),  # another device's token
                           ({"Device-Id": stranger, "Client-Id": stranger,
                             "Authorization": f"Bearer {signed_for_a_stranger}"}, (4403, "auth.forbidden_device"))):
        async with connect(url, additional_headers=headers) as sock:
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(sock.recv(), 10)
        assert closed.value.rcvd is not None and (closed.value.rcvd.code, closed.value.rcvd.reason) == close, headers
    # an oversized message gets the error it gets through Serve, and the socket lives on; a huge
    # one closes the socket before it is read whole
    native = url.replace("/xiaozhi/v1/", "/ws/voice")
    async with await NativeClient.connect(native, Authenticator(server_config.auth).issue_token("big")) as c:
        await c.ws.send(b"\x00" * 200_000)
        err = await _next_json(c.ws, "error")
        assert err["code"] == "limit.too_large"
        assert "4" in (await c.ask_text("What is two plus two?")).reply
        with pytest.raises(ConnectionClosed) as closed:
            await c.ws.send(b"\x00" * (2 << 20))
            while True:  # what the turn left to send, then the close
                await asyncio.wait_for(c.ws.recv(), 10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    with pytest.raises(InvalidStatus):  # only the two socket routes are served here
        async with connect(url.replace("/xiaozhi/v1/", "/ws/text/stream")):
            pass


async def test_a_device_whose_ota_url_is_the_gateways_gets_what_serve_would_answer(server, server_config):
    """The firmware's OTA on the gateway's port (its boot request skips the
    Serve hop too) answers as the replica does, refusals included."""
    device, stranger = DEVICES[1], "0a:0b:0c:0d:0e:14"
    gateway = f"http://127.0.0.1:{GATEWAY_PORT}"
    headers = {"Device-Id": device, "Client-Id": device}
    async with httpx.AsyncClient() as http:
        answers = [await http.post(f"{base}/xiaozhi/ota/", headers=headers, json={"application": {"version": "1.6.0"}})
                   for base in (BASE, gateway)]
        assert [r.status_code for r in answers] == [200, 200], answers[1].text
        via_serve, direct = (r.json() for r in answers)
        assert direct["websocket"]["url"] == via_serve["websocket"]["url"] == f"ws://127.0.0.1:{GATEWAY_PORT}/xiaozhi/v1/"
        assert direct["firmware"] == via_serve["firmware"] == {"version": "1.6.0", "url": ""}
        async with await XiaozhiClient.connect(direct["websocket"]["url"], direct["websocket"]["token"], device,
                                               client_id=device) as c:
            assert c.session_id  # the gateway's token opens the socket
        poll = await http.post(f"{gateway}/xiaozhi/ota/activate", headers=headers)
        assert (poll.status_code, poll.json()) == (200, {"status": "activated"})
        info = (await http.get(f"{gateway}/xiaozhi/ota/")).json()
        assert info["websocket"]["url"] == f"ws://127.0.0.1:{GATEWAY_PORT}/xiaozhi/v1/"
        json_type = {"Content-Type": "application/json"}
        refused = (
            ({"headers": {"Client-Id": device}, "json": {}}, 400, "xiaozhi.missing_device_id"),
            ({"headers": {"Device-Id": stranger, "Client-Id": stranger}, "json": {}}, 403, "auth.forbidden_device"),
            ({"headers": {**headers, **json_type}, "content": b"[" * 1000 + b"]" * 1000}, 400, "request.bad_json"),
            ({"headers": {**headers, **json_type}, "content": b" " * (server_config.limits.max_json_bytes + 1)},
             413, "limit.too_large"),
        )
        for kwargs, status, code in refused:
            for base in (BASE, gateway):
                r = await http.post(f"{base}/xiaozhi/ota/", **kwargs)
                assert (r.status_code, r.json()["error"]["code"]) == (status, code), (base, code, r.text)
        r = await http.get(f"{gateway}/api/sessions")  # the HTTP API stays on Serve
        assert (r.status_code, r.json()["error"]["code"]) == (404, "http.404")
        # a browser test page asks OTA from its own origin: the preflight is answered
        r = await http.options(f"{gateway}/xiaozhi/ota/", headers={
            "Origin": "http://page.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "device-id,client-id,content-type"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] in ("*", "http://page.example")


async def test_connections_that_owe_a_request_are_timed_and_capped(server):
    """Someone on the LAN opening connections and sending no request (or
    half one) held them as long as they liked (uvicorn has no deadline for
    a request): enough of them take the gateway's file limit and lock every
    device out. Each now has `limits.request_read_s`, an address holds at
    most `limits.pending_connections_per_address` at once, and a device is
    served meanwhile."""
    opened = time.monotonic()
    silent = [await asyncio.open_connection("127.0.0.1", GATEWAY_PORT) for _ in range(4)]
    for _, writer in silent[:2]:
        writer.write(b"POST /xiaozhi/ota/ HTTP/1.1\r\nHost: x\r\nDevice-Id: ")  # half its headers, then nothing
    # up to the cap: the next ones are closed as they open
    more = [await asyncio.open_connection("127.0.0.1", GATEWAY_PORT) for _ in range(6)]

    async def closed_at_once(reader: asyncio.StreamReader) -> bool:
        with contextlib.suppress(asyncio.TimeoutError):
            return await asyncio.wait_for(reader.read(), READ_S / 3) == b""
        return False

    at_once = await asyncio.gather(*(closed_at_once(reader) for reader, _ in more))
    assert sum(at_once) == 2  # 8 held by this address (the 4, then 4 of these 6)
    for _, writer in more:
        writer.close()
    await asyncio.sleep(0.2)
    device = DEVICES[2]
    ws = await ota(device)  # the cap is on connections that owe a request, so a device gets in meanwhile
    async with await XiaozhiClient.connect(ws["url"], ws["token"], device, client_id=device) as c:
        assert c.session_id
        for reader, _ in silent:  # closed at their deadline; a socket open as long is not
            assert await asyncio.wait_for(reader.read(), 30) == b""
        took = time.monotonic() - opened
        assert READ_S * 0.9 < took < READ_S * 6, took
        await asyncio.wait_for(await c.ws.ping(), 5)  # the device's socket, older than the deadline, lives
    for _ in range(40):  # the gateway's counts reach /metrics with its next snapshot (every 5 s)
        async with httpx.AsyncClient() as http:
            text = (await http.get(f"{BASE}/metrics")).text
        if 'voice_refused_total{code="limit.request_timeout"} 4' in text:
            break
        await asyncio.sleep(0.5)
    assert 'voice_refused_total{code="limit.request_timeout"} 4' in text
    assert 'voice_refused_total{code="limit.connections"} 2' in text


async def test_a_gateway_that_dies_is_started_again(server):
    device = DEVICES[1]
    ws = await ota(device)
    async with await XiaozhiClient.connect(ws["url"], ws["token"], device, client_id=device) as c:
        sid = c.session_id
    [gateway] = gateways()
    ray.kill(ray.get_actor(gateway["name"], namespace=gateway["namespace"]))
    async with httpx.AsyncClient() as http:
        deadline = time.monotonic() + 60
        while True:  # the replica's lease thread notices within a renewal period and starts it again
            check = (await http.get(f"{BASE}/health")).json()["checks"]["device_gateway"]
            if check["ok"]:
                break
            assert time.monotonic() < deadline, check
            await asyncio.sleep(0.5)
    async with await XiaozhiClient.connect(ws["url"], ws["token"], device, client_id=device) as c:
        assert c.session_id == sid  # sessions live outside the gateway


async def test_a_new_config_replaces_the_gateway_and_its_device_comes_back(server, server_config):
    from ray import serve

    from serve_app import build_app

    device = DEVICES[2]
    ws = await ota(device)
    c = await XiaozhiClient.connect(ws["url"], ws["token"], device, client_id=device)
    sid = c.session_id
    old = gateways()
    changed = server_config.model_copy(update={"ingress": server_config.ingress.model_copy(
                                                   update={"xiaozhi_output_sample_rate": 16000})})
    redeploy = asyncio.create_task(asyncio.to_thread(serve.run, build_app(changed), name=APP, route_prefix="/"))
    messages: list[dict[str, Any]] = []
    deadline = time.monotonic() + 90
    try:
        while True:
            data = await asyncio.wait_for(c.ws.recv(), max(0.1, deadline - time.monotonic()))
            if isinstance(data, str):
                messages.append(json.loads(data))
    except ConnectionClosed as e:
        closed = e
    await redeploy
    assert {"session_id": sid, "type": "goodbye"} in messages
    assert closed.rcvd is not None and closed.rcvd.code == 1012
    new = gateways()
    assert len(new) == 1 and new[0]["name"] != old[0]["name"]  # one gateway per node and config
    ws = await ota(device)
    assert ws["url"] == f"ws://127.0.0.1:{GATEWAY_PORT}/xiaozhi/v1/"
    async with await XiaozhiClient.connect(ws["url"], ws["token"], device, client_id=device) as again:
        assert again.session_id == sid
        assert again.hello["audio_params"]["sample_rate"] == 16000  # the new config's gateway answered


def test_a_new_signing_secret_or_setting_makes_a_new_gateway(server_config):
    from actors.ingress.gateway import config_fingerprint

    same = config_fingerprint(server_config)
    assert config_fingerprint(server_config.model_copy()) == same
    rotated = server_config.auth.model_copy(update={"device_secret": SecretStr("rotated-" + "y" * 40)})
    assert config_fingerprint(server_config.model_copy(update={"auth": rotated})) != same
    slower = server_config.vad.model_copy(update={"end_silence_ms": server_config.vad.end_silence_ms + 1})
    assert config_fingerprint(server_config.model_copy(update={"vad": slower})) != same


def test_the_url_handed_out_is_the_gateway_on_the_node_that_answered(config):
    lease = object.__new__(GatewayLease)
    lease.node_ip, lease.other_node_ips = "10.0.0.7", frozenset({"10.0.0.9"})
    lease.config = config.model_copy(update={"ingress": config.ingress.model_copy(update={"gateway_port": 8100})})
    assert lease.url("127.0.0.1", "/xiaozhi/v1/") == "ws://127.0.0.1:8100/xiaozhi/v1/"  # as the device reached us
    assert lease.url("192.168.1.5", "/xiaozhi/v1/") == "ws://192.168.1.5:8100/xiaozhi/v1/"  # a LAN address of ours
    assert lease.url("voice.lan", "/xiaozhi/v1/") == "ws://voice.lan:8100/xiaozhi/v1/"
    assert lease.url("10.0.0.9", "/xiaozhi/v1/") == "ws://10.0.0.7:8100/xiaozhi/v1/"  # another node's proxy
    assert lease.url("::1", "/xiaozhi/v1/") == "ws://[::1]:8100/xiaozhi/v1/"
    lease.config = lease.config.model_copy(update={"ingress": lease.config.ingress.model_copy(
        update={"gateway_public_url": "wss://voice.example.com:8443/"})})
    assert lease.url("10.0.0.9", "/xiaozhi/v1/") == "wss://voice.example.com:8443/xiaozhi/v1/"
