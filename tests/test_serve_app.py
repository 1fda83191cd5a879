"""The ingress through the real Ray Serve proxy: real sockets, real HTTP."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time

import httpx
import pytest
import ray
from pydantic import SecretStr
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from actors.audio import read_wav, rms_dbfs, silence, wav_bytes
from actors.client import NativeClient, XiaozhiClient
from actors.config import UserConfig
from actors.ingress.auth import Authenticator, hash_password
from actors.protocols.native import unpack_audio
from actors.protocols.xiaozhi import pack_frame
from actors.session_directory import directory_name
from tests.conftest import INGRESS_PORT, TEST_NAMESPACE, hosted_session, run_ingress, served_config

PORT = INGRESS_PORT
BASE = f"http://127.0.0.1:{PORT}"
WS = f"ws://127.0.0.1:{PORT}"
ALLOWED_DEVICES = ["02:00:00:00:00:01", "02:00:00:00:00:02", "02:00:00:00:00:03", "02:00:00:00:00:04"]
QUESTION = "What is twelve times seven?"


@pytest.fixture(scope="module")
def server_config(config):
    # "activation": as on a network, only the allow-list gets in without a code
    return served_config(config, ALLOWED_DEVICES, "activation",
                         users={"alice": UserConfig(password_hash=hash_password("wonderland", iterations=1000))})


@pytest.fixture(scope="module")
def server(ray_cluster, server_config):
    yield from run_ingress(server_config, "voice-actors-test")


@pytest.fixture(scope="module")
def auth(server_config) -> Authenticator:
    return Authenticator(server_config.auth)


def token_for(auth: Authenticator, subject: str = "tester") -> str:
    return auth.issue_token(subject)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def ota(device_id: str) -> dict:
    async with httpx.AsyncClient() as http:
        r = await http.post(f"{BASE}/xiaozhi/ota/", headers={"Device-Id": device_id, "Client-Id": device_id},
                            json={"application": {"version": "1.6.0"}})
    assert r.status_code == 200, r.text
    return r.json()


async def close_code(url: str, headers: dict[str, str] | None = None, first: str | bytes | None = None) -> tuple:
    """Open a socket, optionally send one message, and return how the server closed it."""
    async with connect(url, additional_headers=headers, proxy=None) as ws:
        if first is not None:
            await ws.send(first)
        try:
            while True:
                await asyncio.wait_for(ws.recv(), 10)
        except ConnectionClosed as e:
            return e.rcvd.code, e.rcvd.reason


# ------------------------------------------------------------------ spoken turns
async def test_native_spoken_turn(server, auth, speech):
    async with await NativeClient.connect(f"{WS}/ws/voice", token_for(auth)) as c:
        assert c.hello["audio_out"] == {"format": "pcm16", "sample_rate": 16000, "channels": 1}
        turn = await c.ask_audio(silence(300) + speech(QUESTION), realtime=True)
    assert "12" in turn.transcript and ("7" in turn.transcript or "seven" in turn.transcript.lower()), turn.transcript
    assert "84" in turn.reply
    assert turn.sample_rate == 16000 and len(turn.audio) / 32000 > 0.8 and rms_dbfs(turn.audio) > -35
    assert turn.end_of_speech_to_first_audio_ms is not None and turn.end_of_speech_to_first_audio_ms > 0
    # the reply audio is speech: the server's own STT route hears the answer in it
    async with httpx.AsyncClient(timeout=60) as http:
        r = await http.post(f"{BASE}/api/audio/stt", content=wav_bytes(turn.audio, 16000),
                            headers={**bearer(token_for(auth)), "Content-Type": "audio/wav"})
    assert r.status_code == 200 and ("84" in r.json()["text"] or "eighty" in r.json()["text"].lower()), r.text


async def test_native_opus_both_ways(server, auth, speech):
    async with await NativeClient.connect(f"{WS}/ws/voice", token_for(auth), opus=True, output_opus=True,
                                          output_rate=24000) as c:
        assert c.hello["audio_out"]["format"] == "opus" and c.hello["audio_out"]["sample_rate"] == 24000
        turn = await c.ask_audio(silence(300) + speech(QUESTION), realtime=False)
    assert "84" in turn.reply and "12" in turn.transcript
    assert len(turn.audio) / (2 * 24000) > 0.8 and rms_dbfs(turn.audio) > -35


@pytest.mark.parametrize("version", [1, 2, 3])
async def test_xiaozhi_spoken_turn(server, speech, version):
    device = ALLOWED_DEVICES[version - 1]
    info = await ota(device)
    assert info["websocket"]["url"] == f"{WS}/xiaozhi/v1/" and info["websocket"]["token"].startswith("dv1.")
    assert info["firmware"]["version"] == "1.6.0" and info["server_time"]["timestamp"] > 0
    async with await XiaozhiClient.connect(info["websocket"]["url"], info["websocket"]["token"], device,
                                           client_id=device, version=version) as c:
        assert c.hello["audio_params"] == {"format": "opus", "sample_rate": 24000, "channels": 1,
                                           "frame_duration": 60}
        turn = await c.ask_audio(silence(300) + speech(QUESTION), realtime=True)
    kinds = [(m["type"], m.get("state")) for m in turn.messages]
    assert kinds.index(("stt", None)) < kinds.index(("tts", "start")) < kinds.index(("tts", "sentence_start"))
    assert kinds[-1] == ("tts", "stop")
    assert "12" in turn.transcript and "84" in turn.reply
    assert turn.sample_rate == 24000 and len(turn.audio) / 48000 > 0.8 and rms_dbfs(turn.audio) > -35
    # tts stop comes only once the whole reply has had time to play at the client, which starts
    # playing when its first audio arrives (issue 8 item 4: it came ~0.1 s early, cutting the last word)
    assert turn.audio_done_at >= turn.first_audio_at + len(turn.audio) / 48000, (
        turn.audio_done_at - turn.first_audio_at, len(turn.audio) / 48000)


async def test_xiaozhi_query_string_fallback_and_mcp(server):
    device = ALLOWED_DEVICES[3]
    info = await ota(device)
    url = (f"{WS}/xiaozhi/v1/?device-id={device}&client-id={device}&token={info['websocket']['token']}"
           f"&protocol-version=1")
    async with connect(url, proxy=None) as ws:
        await ws.send(json.dumps({"type": "hello", "version": 1, "transport": "websocket", "features": {"mcp": True},
                                  "audio_params": {"format": "opus", "sample_rate": 16000, "channels": 1,
                                                   "frame_duration": 60}}))
        hello = json.loads(await ws.recv())
        init = json.loads(await ws.recv())
        tools = json.loads(await ws.recv())
        assert hello["type"] == "hello" and hello["session_id"]
        assert init["type"] == "mcp" and init["payload"]["method"] == "initialize"
        assert tools["payload"]["method"] == "tools/list"
        await ws.send(json.dumps({"session_id": hello["session_id"], "type": "mcp", "payload": {
            "jsonrpc": "2.0", "id": 2, "result": {"tools": [{"name": "self.light.set_rgb"}]}}}))
        await ws.send(json.dumps({"session_id": hello["session_id"], "type": "iot",
                                  "descriptors": [{"name": "Speaker"}]}))
        await ws.send(json.dumps({"type": "ping-unknown"}))
        err = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert err["type"] == "error" and err["code"] == "protocol.unknown_type"
    actor = hosted_session(hello["session_id"])
    for _ in range(50):  # the ingress delivers what the device sent, also after it hung up
        state = (await actor.stats.remote())["device_state"]
        if "iot" in state:
            break
        await asyncio.sleep(0.1)
    assert state["mcp"]["result"]["tools"][0]["name"] == "self.light.set_rgb"
    assert state["iot"]["descriptors"][0]["name"] == "Speaker"


# ------------------------------------------------------------------ barge-in and abort
async def _wait_audio(c: NativeClient, min_frames: int) -> int:
    """Read until some reply audio arrived; returns its turn id."""
    frames = 0
    while True:
        data = await asyncio.wait_for(c.ws.recv(), 30)
        if isinstance(data, bytes):
            frames += 1
            if frames >= min_frames:
                return unpack_audio(data)[1]


async def _drain_after_stop(ws, turn: int) -> tuple[list, list]:
    """Read until tts.stop of `turn`, then 0.6 s more; returns (messages, audio turn ids after stop)."""
    messages, after = [], []
    stopped_at = None
    while stopped_at is None or time.monotonic() - stopped_at < 0.6:
        try:
            data = await asyncio.wait_for(ws.recv(), 0.7 if stopped_at else 30)
        except asyncio.TimeoutError:
            break
        if isinstance(data, bytes):
            if stopped_at is not None:
                after.append(unpack_audio(data)[1])
            continue
        msg = json.loads(data)
        messages.append(msg)
        if msg["type"] == "tts.stop" and msg["turn_id"] == turn:
            stopped_at = time.monotonic()
    return messages, after


async def test_native_barge_in_and_interrupt(server, auth, speech):
    async with await NativeClient.connect(f"{WS}/ws/voice", token_for(auth)) as c:
        await c.send_text("Tell me about the Rosetta Stone.")
        turn = await _wait_audio(c, 10)
        await c.stream_pcm(speech("What time is it?"), realtime=False, trailing_silence_ms=0)
        messages, after = await _drain_after_stop(c.ws, turn)
        stop = next(m for m in messages if m["type"] == "tts.stop")
        start = next(m for m in messages if m["type"] == "vad.speech_start")
        assert stop["reason"] == "interrupted" and stop["stream_ms"] == start["stream_ms"]
        assert turn not in after

        await c.send_text("Tell me about the Mona Lisa.")
        turn = await _wait_audio(c, 3)
        await c.interrupt()
        messages, after = await _drain_after_stop(c.ws, turn)
        assert [m["reason"] for m in messages if m["type"] == "tts.stop"] == ["interrupted"]
        assert turn not in after


async def test_xiaozhi_barge_in_and_abort(server, speech):
    device = ALLOWED_DEVICES[0]
    info = await ota(device)
    async with await XiaozhiClient.connect(info["websocket"]["url"], info["websocket"]["token"], device,
                                           client_id=device) as c:
        await c.listen("start", "realtime")
        await c.stream_pcm(speech("Tell me about the Rosetta Stone."), realtime=False)

        async def until(pred, timeout=30):
            while True:
                data = await asyncio.wait_for(c.ws.recv(), timeout)
                if not isinstance(data, bytes) and pred(json.loads(data)):
                    return

        await until(lambda m: m["type"] == "tts" and m["state"] == "sentence_start")
        await asyncio.sleep(0.8)
        await c.stream_pcm(speech("What time is it?"), realtime=False)  # barge in, in realtime mode
        await until(lambda m: m["type"] == "tts" and m["state"] == "stop", timeout=10)
        await until(lambda m: m["type"] == "stt" and "time" in m["text"].lower())
        await until(lambda m: m["type"] == "tts" and m["state"] == "sentence_start")

        await c.listen("stop")
        await c.stream_pcm(speech("Tell me about the Terracotta Army."), realtime=False, trailing_silence_ms=0)
        await c.listen("start", "manual")
        await c.stream_pcm(speech("Tell me about the Terracotta Army."), realtime=False, trailing_silence_ms=300)
        await c.listen("stop", "manual")
        await until(lambda m: m["type"] == "stt" and "terracotta" in m["text"].lower())
        await until(lambda m: m["type"] == "tts" and m["state"] == "sentence_start")
        await c.abort("wake_word_detected")
        await until(lambda m: m["type"] == "tts" and m["state"] == "stop", timeout=10)
        stray = []
        try:
            while True:
                data = await asyncio.wait_for(c.ws.recv(), 0.7)
                if isinstance(data, bytes):
                    stray.append(data)
        except asyncio.TimeoutError:
            pass
        assert stray == []


# ------------------------------------------------------------------ sessions
async def test_reconnect_resumes_and_delete_ends_the_actor(server, auth):
    token = token_for(auth, "resumer")
    async with await NativeClient.connect(f"{WS}/ws/voice", token) as c:
        sid = c.session_id
        assert c.hello["resumed"] is False
        await c.ask_text("My name is Ana.")
    async with await NativeClient.connect(f"{WS}/ws/voice", token, session_id=sid) as c:
        assert c.hello["resumed"] is True and c.session_id == sid
        turn = await c.ask_text("What is my name?")
        assert "Ana" in turn.reply
    async with httpx.AsyncClient() as http:
        other = await http.get(f"{BASE}/api/session/validate/{sid}", headers=bearer(token_for(auth, "mallory")))
        unknown = await http.get(f"{BASE}/api/session/validate/0123456789abcdef", headers=bearer(token))
        assert other.status_code == unknown.status_code == 200
        assert other.json() == {"session_id": sid, "valid": False} and unknown.json()["valid"] is False
        ok = await http.get(f"{BASE}/api/session/validate/{sid}", headers=bearer(token))
        assert ok.json()["valid"] is True and ok.json()["live"] is True and ok.json()["history_messages"] >= 4
        gone = await http.delete(f"{BASE}/api/session/{sid}", headers=bearer(token))
        assert gone.status_code == 200 and gone.json()["ended"] is True
        for _ in range(50):
            if hosted_session(sid) is None:
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("session actor still alive after DELETE")
        again = await http.get(f"{BASE}/api/session/validate/{sid}", headers=bearer(token))
        assert again.json()["valid"] is False
        missing = await http.delete(f"{BASE}/api/session/{sid}", headers=bearer(token))
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "session.not_found"


async def test_xiaozhi_device_keeps_its_session_across_connections(server, speech):
    device = ALLOWED_DEVICES[1]
    info = await ota(device)
    ids = []
    for _ in range(2):
        async with await XiaozhiClient.connect(info["websocket"]["url"], info["websocket"]["token"], device,
                                               client_id=device) as c:
            ids.append(c.session_id)
    assert ids[0] == ids[1]
    # once its session actor has ended (reaped, or ended by hand), the device gets it back on its
    # next connection, conversation and all, from the store
    with contextlib.suppress(ray.exceptions.RayActorError):  # it exits while answering
        await hosted_session(ids[0]).close.remote()
    await asyncio.sleep(0.5)
    async with await XiaozhiClient.connect(info["websocket"]["url"], info["websocket"]["token"], device,
                                           client_id=device) as c:
        assert c.session_id == ids[0]


@pytest.mark.parametrize("ended", ["closed", "killed"])
async def test_xiaozhi_device_whose_session_needs_a_new_actor_hears_hello_first_and_loses_no_audio(
        server, speech, ended):
    """A session that must start on a new actor (none ready: a burst, or a
    device back after its session ended) answers hello at once; the audio
    sent right after it waits in the socket and makes a normal turn.
    `killed`: an actor that died without a word, so the directory still
    names it as the host; its claim fails, and the new start must not come
    before the hello either (it did: the hello waited for the whole start)."""
    device = ALLOWED_DEVICES[3]
    info = await ota(device)
    async with await XiaozhiClient.connect(info["websocket"]["url"], info["websocket"]["token"], device,
                                           client_id=device) as c:
        sid = c.session_id
    for _ in range(300):  # its hello came first: the actor may still be starting
        hosted = hosted_session(sid)
        if hosted is not None:
            break
        await asyncio.sleep(0.1)
    assert hosted is not None
    if ended == "killed":
        ray.kill(hosted.actor)
    else:
        with contextlib.suppress(ray.exceptions.RayActorError):  # it exits while answering
            await hosted.close.remote()
    await asyncio.sleep(0.5)

    def hello_first(text: str) -> float:
        line = [x for x in text.splitlines() if x.startswith('voice_hello_before_session_total{protocol="xiaozhi"}')]
        return float(line[0].split()[-1]) if line else 0.0

    async with httpx.AsyncClient(timeout=60) as http:
        before = hello_first((await http.get(f"{BASE}/metrics")).text)
        async with await XiaozhiClient.connect(info["websocket"]["url"], info["websocket"]["token"], device,
                                               client_id=device) as c:
            assert c.session_id == sid and c.hello.get("session_id") == sid
            turn = await c.ask_audio(silence(300) + speech(QUESTION), realtime=False)  # all of it at once
            live = await ray.get_actor(directory_name(), namespace=TEST_NAMESPACE).live.remote()
        after = hello_first((await http.get(f"{BASE}/metrics")).text)
    assert sid in live  # its place under the caps is counted (the failed claim's fallback freed it)
    assert after == before + 1
    assert "12" in turn.transcript and "84" in turn.reply, (turn.transcript, turn.reply)


async def test_native_session_resumed_on_a_new_actor_hears_hello_first(server, auth):
    token = token_for(auth, "returning")
    async with await NativeClient.connect(f"{WS}/ws/voice", token) as c:
        sid = c.session_id
        assert "Ana" in (await c.ask_text("My name is Ana.")).reply
    with contextlib.suppress(ray.exceptions.RayActorError):  # it exits while answering
        await hosted_session(sid).close.remote()
    await asyncio.sleep(0.5)
    async with httpx.AsyncClient(timeout=60) as http:
        metric = 'voice_hello_before_session_total{protocol="native"}'
        count = lambda text: sum(float(x.split()[-1]) for x in text.splitlines() if x.startswith(metric))  # noqa: E731
        before = count((await http.get(f"{BASE}/metrics")).text)
        async with await NativeClient.connect(f"{WS}/ws/voice", token, sid) as c:
            assert c.session_id == sid and c.hello["resumed"]
            # the client uses its session at once over HTTP, while the actor is still starting: the
            # request waits for the socket's subscription, so the device hears the turn
            heard = asyncio.create_task(c.receive_turn(timeout_s=60))
            r = await http.post(f"{BASE}/api/text/process", headers=bearer(token),
                                json={"text": "What is my name?", "session_id": sid})
            turn = await heard
        assert count((await http.get(f"{BASE}/metrics")).text) == before + 1
    turn_ids = {m["turn_id"] for m in turn.messages if m["type"] == "metrics"}
    assert r.status_code == 200 and turn_ids == {r.json()["turn_id"]} and "Ana" in r.json()["reply"], r.text
    assert "Ana" in turn.reply and not turn.errors and len(turn.audio) > 0, (turn.reply, turn.errors)


# ------------------------------------------------------------------ auth and limits
async def test_http_auth_refusals(server, auth, server_config):
    wrong = Authenticator(server_config.auth.model_copy(update={"jwt_secret": SecretStr("another-secret-xxxxxxxxxxxxxxxxxxxxxxxx")}))
    old = Authenticator(server_config.auth, clock=lambda: time.time() - 7200)
    async with httpx.AsyncClient() as http:
        for headers, code in [({}, "auth.missing_token"), (bearer(wrong.issue_token("x")), "auth.bad_token"),
                              (bearer(old.issue_token("x")), "auth.expired"), (bearer("garbage"), "auth.bad_token")]:
            r = await http.get(f"{BASE}/api/auth/me", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == code, (code, r.text)
        good = await http.post(f"{BASE}/api/auth/login", json={"username": "alice", "password": "wonderland"})
        assert good.status_code == 200
        me = await http.get(f"{BASE}/api/auth/me", headers=bearer(good.json()["access_token"]))
        assert me.json()["subject"] == "alice" and me.json()["kind"] == "user"
        bad = await http.post(f"{BASE}/api/auth/login", json={"username": "alice", "password": "nope"})
        assert bad.status_code == 401 and bad.json()["error"]["code"] == "auth.bad_credentials"
        unknown = await http.post(f"{BASE}/api/auth/login", json={"username": "bob", "password": "wonderland"})
        assert unknown.json()["error"]["code"] == "auth.bad_credentials"
        malformed = await http.post(f"{BASE}/api/auth/login", json={"username": "alice"})
        assert malformed.status_code == 422 and malformed.json()["error"]["code"] == "request.invalid"


async def test_socket_auth_refusals(server, auth, server_config):
    wrong = Authenticator(server_config.auth.model_copy(update={"jwt_secret": SecretStr("another-secret-xxxxxxxxxxxxxxxxxxxxxxxx")}))
    old = Authenticator(server_config.auth, clock=lambda: time.time() - 7200)
    assert await close_code(f"{WS}/ws/voice") == (4401, "auth.missing_token")
    assert await close_code(f"{WS}/ws/voice", bearer(wrong.issue_token("x"))) == (4401, "auth.bad_token")
    assert await close_code(f"{WS}/ws/voice?token={old.issue_token('x')}") == (4401, "auth.expired")
    # a device token is bound to its device: another device id cannot use it
    token = (await ota(ALLOWED_DEVICES[0]))["websocket"]["token"]
    xz = {"Protocol-Version": "1", "Client-Id": ALLOWED_DEVICES[1], "Device-Id": ALLOWED_DEVICES[1],
          **bearer(token)}
    assert await close_code(f"{WS}/xiaozhi/v1/", xz) == (4401, "auth.bad_device_token")
    stranger = {**xz, "Device-Id": "0a:0b:0c:0d:0e:0f", "Client-Id": "0a:0b:0c:0d:0e:0f",
                **bearer(auth.issue_device_token("0a:0b:0c:0d:0e:0f", "0a:0b:0c:0d:0e:0f"))}
    assert await close_code(f"{WS}/xiaozhi/v1/", stranger) == (4403, "auth.forbidden_device")
    async with httpx.AsyncClient() as http:
        r = await http.post(f"{BASE}/xiaozhi/ota/", headers={"Device-Id": "0a:0b:0c:0d:0e:0f"}, json={})
        assert r.status_code == 200 and "websocket" not in r.json() and len(r.json()["activation"]["code"]) == 6
        r = await http.post(f"{BASE}/xiaozhi/ota/", json={})
        assert r.status_code == 400 and r.json()["error"]["code"] == "xiaozhi.missing_device_id"


async def test_rate_limit_trips_per_client(server, auth):
    flooder, bystander = token_for(auth, "flooder"), token_for(auth, "bystander")
    async with httpx.AsyncClient() as http:
        # at once: one by one on a slow machine, the bucket refills as fast as requests arrive
        answers = await asyncio.gather(*(http.get(f"{BASE}/api/auth/me", headers=bearer(flooder))
                                         for _ in range(80)))
        assert any(r.status_code == 200 for r in answers)
        # the refusal itself is checked (a later request may find a token refilled on a slow machine)
        limited = next(r for r in answers if r.status_code == 429)
        assert limited.json()["error"]["code"] == "limit.rate"
        assert int(limited.headers["Retry-After"]) >= 1
        assert (await http.get(f"{BASE}/api/auth/me", headers=bearer(bystander))).status_code == 200


# ------------------------------------------------------------------ bad input over sockets
async def test_bad_messages_get_errors_and_the_socket_survives(server, auth):
    async with await NativeClient.connect(f"{WS}/ws/voice", token_for(auth)) as c, \
            await NativeClient.connect(f"{WS}/ws/voice", token_for(auth)) as bystander:
        for bad, code in [("{not json", "protocol.bad_json"), (json.dumps({"type": "dance"}), "protocol.unknown_type"),
                          (json.dumps([1, 2]), "protocol.bad_message"), (b"\x00" * 200_000, "limit.too_large"),
                          (b"\x00" * 33_000, "audio.frame_too_large"), (b"\x00\x01\x02", "audio.odd_length")]:
            await c.ws.send(bad)
            err = await _next_json(c.ws, "error")
            assert err["code"] == code, (code, err)
        await c.send_json({"type": "ping", "id": 7})
        assert (await _next_json(c.ws, "pong"))["id"] == 7
        assert "4" in (await c.ask_text("What is two plus two?")).reply
        assert "Today is" in (await bystander.ask_text("What is the date today?")).reply


async def test_binary_before_hello_and_bad_hello_close_the_socket(server, auth):
    headers = bearer(token_for(auth))
    assert await close_code(f"{WS}/ws/voice", headers, b"\x00\x00" * 480) == (4400, "protocol.hello_required")
    assert await close_code(f"{WS}/ws/voice", headers, json.dumps({"type": "text", "text": "hi"})) == (
        4400, "protocol.hello_required")
    bad_rate = json.dumps({"type": "hello", "version": 1, "audio": {"format": "pcm16", "sample_rate": 44100}})
    assert await close_code(f"{WS}/ws/voice", headers, bad_rate) == (4400, "protocol.bad_hello")
    assert await close_code(f"{WS}/ws/voice", headers, json.dumps({"type": "hello", "version": 9})) == (
        4400, "protocol.version")


async def test_xiaozhi_bad_opus_packet_is_reported_and_skipped(server, speech):
    device = ALLOWED_DEVICES[2]
    info = await ota(device)
    async with await XiaozhiClient.connect(info["websocket"]["url"], info["websocket"]["token"], device,
                                           client_id=device, version=3) as c:
        await c.listen("start", "auto")
        await c.ws.send(pack_frame(3, b"\xff\xfe\xfd"))
        err = await _next_json(c.ws, "error")
        assert err["code"] == "audio.bad_opus"
        await c.ws.send(b"\x00\x00\x00\x09abc")  # header says 9 bytes, 3 follow
        assert (await _next_json(c.ws, "error"))["code"] == "xiaozhi.bad_frame"
        turn = await c.ask_audio(silence(300) + speech(QUESTION), realtime=False)
        assert "84" in turn.reply


async def _next_json(ws, kind: str) -> dict:
    while True:
        data = await asyncio.wait_for(ws.recv(), 15)
        if isinstance(data, str):
            msg = json.loads(data)
            if msg.get("type") == kind:
                return msg


# ------------------------------------------------------------------ HTTP API
async def test_text_routes(server, auth):
    h = bearer(token_for(auth))
    async with httpx.AsyncClient(timeout=60) as http:
        r = await http.post(f"{BASE}/api/text/process", json={"text": "What is twelve times seven?"}, headers=h)
        assert r.status_code == 200 and "84" in r.json()["reply"] and r.json()["metrics"]["llm_first_token_ms"] >= 0
        r = await http.post(f"{BASE}/api/text/process", json={"text": ""}, headers=h)
        assert r.status_code == 422 and r.json()["error"]["code"] == "request.invalid"
        r = await http.post(f"{BASE}/api/text/batch", json={"texts": ["My name is Ana.", "What is my name?"]},
                            headers=h)
        assert r.status_code == 200 and "Ana" in r.json()["results"][1]["reply"]
        r = await http.post(f"{BASE}/api/text/batch", json={"texts": []}, headers=h)
        assert r.status_code == 422
    async with connect(f"{WS}/ws/text/stream", additional_headers=h, proxy=None) as ws:
        await ws.send(json.dumps({"type": "text", "text": "What time is it?"}))
        hello = json.loads(await ws.recv())
        assert hello["type"] == "hello" and hello["session_id"]
        deltas, kinds = [], []
        while True:
            msg = json.loads(await asyncio.wait_for(ws.recv(), 30))
            kinds.append(msg["type"])
            if msg["type"] == "llm.delta":
                deltas.append(msg["text"])
            if msg["type"] == "metrics":
                break
        assert "".join(deltas).startswith("It is") and "tool.call" in kinds and "tts.audio" not in kinds
        await ws.send(b"\x00\x00")
        assert json.loads(await ws.recv())["code"] == "protocol.no_audio"


async def test_audio_routes(server, auth, speech):
    h = bearer(token_for(auth))
    question = wav_bytes(silence(300) + speech(QUESTION) + silence(300), 16000)
    async with httpx.AsyncClient(timeout=120) as http:
        r = await http.post(f"{BASE}/api/audio/stt", content=question, headers={**h, "Content-Type": "audio/wav"})
        assert r.status_code == 200 and "12" in r.json()["text"]
        files = {"file": ("q.wav", question, "audio/wav")}
        r = await http.post(f"{BASE}/api/audio/stt", files=files, headers=h)
        assert r.status_code == 200 and "12" in r.json()["text"]
        r = await http.post(f"{BASE}/api/audio/stt", content=b"\x89PNG\r\n\x1a\n" + b"\x00" * 100,
                            headers={**h, "Content-Type": "image/png"})
        assert r.status_code == 415 and r.json()["error"]["code"] == "audio.unsupported_format"

        r = await http.post(f"{BASE}/api/audio/tts", json={"text": "The museum opens at nine.", "sample_rate": 22050},
                            headers=h)
        assert r.status_code == 200 and r.headers["content-type"] == "audio/wav"
        pcm = read_wav(r.content, 22050)
        assert len(pcm) / 44100 > 1.0 and rms_dbfs(pcm) > -35
        r = await http.post(f"{BASE}/api/audio/tts", json={"text": ""}, headers=h)
        assert r.status_code == 422

        r = await http.post(f"{BASE}/api/audio/process", content=question, headers={**h, "Content-Type": "audio/wav"})
        body = r.json()
        assert r.status_code == 200 and "12" in body["transcript"] and "84" in body["reply"], body
        reply = read_wav(base64.b64decode(body["audio_wav_base64"]))
        assert len(reply) / 32000 > 0.8 and rms_dbfs(reply) > -35
        r = await http.post(f"{BASE}/api/audio/process", content=b"hello, I am text",
                            headers={**h, "Content-Type": "text/plain"})
        assert r.status_code == 415
        r = await http.post(f"{BASE}/api/audio/process", content=wav_bytes(silence(2000), 16000),
                            headers={**h, "Content-Type": "audio/wav"})
        assert r.status_code == 422 and r.json()["error"]["code"] == "audio.no_speech"


async def test_voice_start_end_and_metrics(server, auth):
    h = bearer(token_for(auth, "caller"))
    async with httpx.AsyncClient(timeout=60) as http:
        r = await http.post(f"{BASE}/api/voice/start", json={}, headers=h)
        assert r.status_code == 200 and r.json()["websocket"]["url"] == f"{WS}/ws/voice"
        sid = r.json()["session_id"]
        async with await NativeClient.connect(r.json()["websocket"]["url"], h["Authorization"][7:], sid) as c:
            assert c.session_id == sid
        r = await http.post(f"{BASE}/api/voice/end", json={"session_id": sid}, headers=h)
        assert r.status_code == 200 and r.json()["ended"]
        r = await http.post(f"{BASE}/api/voice/end", json={"session_id": sid}, headers=h)
        assert r.status_code == 404
        r = await http.post(f"{BASE}/api/voice/end", json={"session_id": "../../etc"}, headers=h)
        assert r.status_code == 422
        text = (await http.get(f"{BASE}/metrics")).text
        assert "voice_connections_total" in text and "voice_first_audio_seconds_count" in text
        assert (await http.get(f"{BASE}/health")).json()["status"] == "ok"
        spec = (await http.get(f"{BASE}/openapi.json")).json()
        for path in ["/api/text/process", "/api/text/batch", "/api/audio/stt", "/api/audio/tts", "/api/audio/process",
                     "/api/voice/start", "/api/voice/end", "/api/auth/login", "/api/auth/me",
                     "/api/session/validate/{session_id}", "/api/session/{session_id}", "/xiaozhi/ota/", "/health"]:
            assert path in spec["paths"], path


async def test_concurrent_socket_cap_per_client(server, auth, server_config):
    token = token_for(auth, "hoarder")
    cap = server_config.limits.max_sessions_per_client
    held = [await connect(f"{WS}/ws/voice", additional_headers=bearer(token), proxy=None) for _ in range(cap)]
    try:
        await asyncio.sleep(0.3)
        assert await close_code(f"{WS}/ws/voice", bearer(token)) == (4429, "limit.client_sessions")
        async with await NativeClient.connect(f"{WS}/ws/voice", token_for(auth, "someone-else")) as other:
            assert other.session_id
    finally:
        for ws in held:
            await ws.close()
    await asyncio.sleep(0.3)
    async with await NativeClient.connect(f"{WS}/ws/voice", token) as again:  # slots came back
        assert again.session_id


# ------------------------------------------------------------------ clients people already have (issue 8)
XIAOZHI_HELLO = json.dumps({"type": "hello", "version": 1, "transport": "websocket",
                            "audio_params": {"format": "opus", "sample_rate": 16000, "channels": 1,
                                             "frame_duration": 60}})


async def _until(ws, pred, timeout: float = 30) -> dict:
    while True:
        data = await asyncio.wait_for(ws.recv(), timeout)
        if isinstance(data, str) and pred(msg := json.loads(data)):
            return msg


async def test_browser_pages_get_cors_answers(server):
    """Item 1: the reference server's browser page could not even start (OPTIONS /xiaozhi/ota/ was 405)."""
    origin = {"Origin": "http://192.168.1.7:8006"}
    async with httpx.AsyncClient() as http:
        pre = await http.options(f"{BASE}/xiaozhi/ota/", headers={
            **origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "device-id,client-id,content-type"})
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] in ("*", origin["Origin"])
        assert "POST" in pre.headers["access-control-allow-methods"]
        assert "device-id" in pre.headers["access-control-allow-headers"].lower()
        r = await http.post(f"{BASE}/xiaozhi/ota/", headers={**origin, "Device-Id": ALLOWED_DEVICES[0]}, json={})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] in ("*", origin["Origin"])
        r = await http.get(f"{BASE}/api/auth/me", headers=origin)  # a refusal still carries the header
        assert r.status_code == 401 and "access-control-allow-origin" in r.headers


async def test_browser_xiaozhi_clients_authenticate_in_the_query_string(server):
    """Item 2: `?authorization=Bearer%20<token>&device-id=...&client-id=...` was closed with 4401."""
    device = ALLOWED_DEVICES[0]
    info = await ota(device)
    from urllib.parse import quote

    url = (f"{WS}/xiaozhi/v1/?device-id={quote(device)}&client-id={quote(device)}"
           f"&authorization={quote('Bearer ' + info['websocket']['token'])}")
    async with connect(url, proxy=None) as ws:
        await ws.send(XIAOZHI_HELLO)
        hello = json.loads(await asyncio.wait_for(ws.recv(), 15))
        assert hello["type"] == "hello" and hello["session_id"]


async def test_typed_chat_and_wake_words_over_listen_detect(server):
    """Items 3 and 5: typed chat from py-xiaozhi and the browser page got no reply; an empty
    binary frame (end of a recording) got audio.bad_opus."""
    device = ALLOWED_DEVICES[2]
    info = await ota(device)
    async with await XiaozhiClient.connect(info["websocket"]["url"], info["websocket"]["token"], device,
                                           client_id=device, version=3) as c:
        await c.ws.send(pack_frame(3, b""))
        await c.ws.send(b"")
        await c.send_json({"type": "listen", "state": "detect", "text": "What is twelve times seven?"})
        first = await _until(c.ws, lambda m: True)
        assert first["type"] != "error", first  # the empty frames were ignored, not refused
        said = await _until(c.ws, lambda m: m["type"] == "tts" and m.get("state") == "sentence_start")
        assert "84" in said["text"]
        await _until(c.ws, lambda m: m["type"] == "tts" and m.get("state") == "stop")
        await c.send_json({"type": "listen", "state": "detect", "text": "你好小智"})
        greeting = await _until(c.ws, lambda m: m["type"] == "tts" and m.get("state") == "sentence_start")
        assert "Ava" in greeting["text"]


async def test_ota_websocket_url_uses_the_address_the_device_used(server):
    """Item 7: a device on the LAN must be told the address it reached, not loopback."""
    async with httpx.AsyncClient() as http:
        r = await http.post(f"{BASE}/xiaozhi/ota/", json={},
                            headers={"Device-Id": ALLOWED_DEVICES[0], "Host": "192.168.1.50:8000"})
    assert r.json()["websocket"]["url"] == "ws://192.168.1.50:8000/xiaozhi/v1/"


async def test_health_reports_real_state_and_503_when_degraded(server, server_config):
    """Item 13: /health said ok whatever the state."""
    import sqlite3

    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.get(f"{BASE}/health")
        body = r.json()
        assert r.status_code == 200 and body["status"] == "ok"
        assert body["checks"]["pool:stt"]["ok"] and body["checks"]["pool:tts"]["ok"] and body["checks"]["store"]["ok"]
        sessions = body["checks"]["sessions"]
        assert sessions["ok"] and sessions["hosts"] >= body["warm_sessions_ready"], sessions
        lock = sqlite3.connect(server_config.resolve_path(server_config.session.history_db), timeout=1)
        lock.execute("BEGIN EXCLUSIVE")  # the store cannot take a write while this is held
        try:
            r = await http.get(f"{BASE}/health")
        finally:
            lock.rollback()
            lock.close()
        assert r.status_code == 503 and r.json()["status"] == "degraded" and not r.json()["checks"]["store"]["ok"]


async def test_metrics_are_the_deployments_not_one_replicas(ray_cluster):
    """Item 13: every replica's snapshot is summed by the hub, whichever replica answers."""
    from actors.ingress.metrics import IngressMetrics, MetricsHub

    a, b = IngressMetrics(), IngressMetrics()
    for m, n in ((a, 2), (b, 3)):
        for _ in range(n):
            m.connected("xiaozhi")
    b.refused("auth.bad_token")
    hub = MetricsHub.remote()
    await hub.put.remote("replica-a", a.snapshot())
    await hub.put.remote("replica-b", b.snapshot())
    await hub.put.remote("replica-a", a.snapshot())  # a newer snapshot replaces, never adds
    text = await hub.render.remote()
    assert 'voice_connections_total{protocol="xiaozhi"} 5' in text
    assert 'voice_active_sockets{protocol="xiaozhi"} 5' in text
    assert 'voice_refused_total{code="auth.bad_token"} 1' in text
    assert "# TYPE voice_first_audio_seconds histogram" in text and "ingress processes reporting (replicas and device gateways): 2" in text
    ray.kill(hub)


async def test_push_to_talk_is_checked_for_speech_and_trimmed(server, speech):
    """Item 6: a silent push-to-talk recording got a reply to a hallucinated "you"; silence
    around the words is cut before recognition."""
    device = ALLOWED_DEVICES[1]
    info = await ota(device)
    async with await XiaozhiClient.connect(info["websocket"]["url"], info["websocket"]["token"], device,
                                           client_id=device) as c:
        await c.listen("start", "manual")
        await c.stream_pcm(silence(2000), realtime=False, trailing_silence_ms=0)
        await c.listen("stop", "manual")
        err = await _until(c.ws, lambda m: m["type"] in ("error", "stt"))
        assert err["type"] == "error" and err["code"] == "audio.no_speech", err
        await asyncio.sleep(1.0)  # sent faster than real time: let the socket's message budget refill

        await c.listen("start", "manual")
        await c.stream_pcm(silence(1500) + speech(QUESTION) + silence(1500), realtime=False, trailing_silence_ms=0)
        await c.listen("stop", "manual")
        stt = await _until(c.ws, lambda m: m["type"] in ("error", "stt"))
        assert stt["type"] == "stt" and "12" in stt["text"] and ("7" in stt["text"] or "seven" in stt["text"].lower()), stt
        said = await _until(c.ws, lambda m: m["type"] == "tts" and m.get("state") == "sentence_start")
        assert "84" in said["text"]


# ---------------------------------------------------------------- personas (issue 10, item 1)
async def test_roles_lists_the_shipped_personas(server, auth):
    async with httpx.AsyncClient() as http:
        r = await http.get(f"{BASE}/api/roles", headers=bearer(token_for(auth)))
        anonymous = await http.get(f"{BASE}/api/roles")
    assert r.status_code == 200 and anonymous.status_code == 401
    roles = {role["id"]: role for role in r.json()["roles"]}
    assert {"museum-guide", "museum-guide-zh", "storyteller", "home-assistant"} <= roles.keys()
    assert r.json()["default"] == "museum-guide" and roles["museum-guide-zh"]["language"] == "zh"
    assert roles["storyteller"]["greeting"].startswith("Hello, I'm Luna")
    assert "system_prompt" not in roles["storyteller"]


async def test_a_session_takes_its_persona_at_hello_and_keeps_it_when_resumed(server, auth):
    token = token_for(auth, "persona-user")
    async with await NativeClient.connect(f"{WS}/ws/voice", token, persona="storyteller") as c:
        started = c.hello
        turn = await c.ask_text("Hello!")
        sid = c.session_id
    assert "Luna" in turn.reply, turn.reply
    async with await NativeClient.connect(f"{WS}/ws/voice", token, session_id=sid) as c:
        again = await c.ask_text("Hello again!")
    assert "Luna" in again.reply, again.reply
    async with httpx.AsyncClient() as http:
        r = await http.post(f"{BASE}/api/text/process", headers=bearer(token),
                            json={"text": "Hello!", "persona": "home-assistant", "session_id": sid})
        unknown = await http.post(f"{BASE}/api/text/process", headers=bearer(token),
                                  json={"text": "Hello!", "persona": "nonesuch"})
    assert r.status_code == 200 and "Max" in r.json()["reply"], r.text
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "persona.not_found"
    assert started["type"] == "hello"


async def test_a_device_speaks_as_the_persona_its_owner_chose(server, auth):
    device = ALLOWED_DEVICES[3]
    admin = auth.issue_token("root", roles=("user", "admin"))  # allow-listed devices have no owner
    async with httpx.AsyncClient() as http:
        info = await ota(device)
        r = await http.patch(f"{BASE}/api/devices/{device}", headers=bearer(admin), json={"persona": "home-assistant"})
        stranger = await http.patch(f"{BASE}/api/devices/{device}", headers=bearer(token_for(auth, "mallory")),
                                    json={"persona": "storyteller"})
        listed = await http.get(f"{BASE}/api/devices", headers=bearer(admin))
    assert r.status_code == 200 and stranger.status_code == 404, (r.text, stranger.text)
    assert {d["device_id"]: d["persona"] for d in listed.json()["devices"]}[device] == "home-assistant"
    async with await XiaozhiClient.connect(info["websocket"]["url"], info["websocket"]["token"], device,
                                           client_id=device, version=3) as c:
        await c.send_json({"type": "listen", "state": "detect", "text": "你好小智"})
        greeting = await _until(c.ws, lambda m: m["type"] == "tts" and m.get("state") == "sentence_start")
    assert greeting["text"].startswith("Hi, Max here"), greeting


# ---------------------------------------------------------------- long-term memory API (issue 10, item 3)
async def test_memories_are_the_callers_own_and_can_be_listed_exported_and_deleted(server, auth):
    alice, bob = bearer(token_for(auth, "mem-alice")), bearer(token_for(auth, "mem-bob"))
    async with httpx.AsyncClient() as http:
        r = await http.post(f"{BASE}/api/text/process", headers=alice,
                            json={"text": "Please remember that my cat is called Miso."})
        assert r.status_code == 200, r.text
        for _ in range(50):  # written beside the reply, not before it
            mine = (await http.get(f"{BASE}/api/memories", headers=alice)).json()
            if mine["memories"]:
                break
            await asyncio.sleep(0.1)
        assert [m["text"] for m in mine["memories"]] == ["my cat is called Miso"], mine
        assert (await http.get(f"{BASE}/api/memories", headers=bob)).json()["memories"] == []
        added = await http.post(f"{BASE}/api/memories", headers=alice, json={"text": "I live in Lyon."})
        assert added.status_code == 201, added.text
        export = await http.get(f"{BASE}/api/memories/export", headers=alice)
        assert export.status_code == 200 and "attachment" in export.headers["content-disposition"]
        assert len(export.json()["memories"]) == 2
        memory_id = mine["memories"][0]["id"]
        stolen = await http.delete(f"{BASE}/api/memories/{memory_id}", headers=bob)
        assert stolen.status_code == 404 and stolen.json()["error"]["code"] == "memory.not_found"
        assert (await http.delete(f"{BASE}/api/memories/{memory_id}", headers=alice)).status_code == 200
        too_long = await http.post(f"{BASE}/api/memories", headers=alice, json={"text": "x" * 5000})
        assert too_long.status_code == 413 and too_long.json()["error"]["code"] == "memory.too_long"
        assert (await http.delete(f"{BASE}/api/memories", headers=alice)).status_code == 200
        assert (await http.get(f"{BASE}/api/memories", headers=alice)).json()["memories"] == []
        assert (await http.get(f"{BASE}/api/memories")).status_code == 401


# ---------------------------------------------------------------- knowledge base API (issue 10, item 4)
async def test_knowledge_search_cites_the_museum_and_admins_ingest_documents(server, auth):
    user, admin = bearer(token_for(auth, "kb-user")), bearer(auth.issue_token("kb-admin", roles=("user", "admin")))
    doc = "# Sundial\n\nThe courtyard sundial was made in 1721 by the clockmaker Jonas Brandt.\n"
    async with httpx.AsyncClient() as http:
        r = await http.get(f"{BASE}/api/knowledge/search", params={"q": "Who deciphered the Rosetta Stone?"},
                           headers=user)
        assert r.status_code == 200, r.text
        assert r.json()["hits"][0]["source"].endswith("Rosetta Stone") and "[1]" in r.json()["context"]
        outside = await http.get(f"{BASE}/api/knowledge/search", params={"q": "best pizza in Naples"}, headers=user)
        assert outside.json()["found"] is False and "don't have that in your notes" in outside.json()["context"]
        refused = await http.post(f"{BASE}/api/knowledge/documents", params={"name": "sundial.md"}, content=doc,
                                  headers={**user, "Content-Type": "text/markdown"})
        assert refused.status_code == 403
        added = await http.post(f"{BASE}/api/knowledge/documents", params={"name": "sundial.md"}, content=doc,
                                headers={**admin, "Content-Type": "text/markdown"})
        assert added.status_code == 201, added.text
        found = await http.get(f"{BASE}/api/knowledge/search", params={"q": "Who made the sundial?"}, headers=user)
        assert found.json()["hits"][0]["source"].startswith("sundial.md"), found.json()
        bad = await http.post(f"{BASE}/api/knowledge/documents", params={"name": "../etc/passwd"}, content=doc,
                              headers={**admin, "Content-Type": "text/markdown"})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "knowledge.bad_name"
        removed = await http.delete(f"{BASE}/api/knowledge/documents/sundial.md", headers=admin)
        assert removed.status_code == 200


async def test_a_new_session_greets_as_its_persona_when_asked(server, auth):
    token = token_for(auth, "greet-user")
    async with await NativeClient.connect(f"{WS}/ws/voice", token, persona="storyteller", greet=True) as c:
        said = await _until(c.ws, lambda m: isinstance(m, dict) and m.get("type") == "tts.sentence")
        sid = c.session_id
    assert said["text"].startswith("Hello, I'm Luna"), said
    async with await NativeClient.connect(f"{WS}/ws/voice", token, session_id=sid, greet=True) as c:
        with pytest.raises(asyncio.TimeoutError):  # resumed: no second greeting
            await _until(c.ws, lambda m: m.get("type") == "tts.sentence", timeout=2)
