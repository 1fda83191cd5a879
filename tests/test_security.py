"""Issue 7's findings, each reproduced as the attack it was and shown to fail
now, through the real Serve proxy (docs/security.md has the threat model).

The server here is configured as it would be on a network: device
activation on, small caps, short timeouts, so each limit can be reached in
seconds. The flood of bad tokens, which locks out this test's address, runs
last.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.conftest import INGRESS_PORT, hosted_session, run_ingress
from actors.audio import wav_bytes
from actors.client import NativeClient, XiaozhiClient
from actors.config import UserConfig
from actors.ingress.auth import Authenticator, hash_password

PORT = INGRESS_PORT
BASE = f"http://127.0.0.1:{PORT}"
WS = f"ws://127.0.0.1:{PORT}"
NS = "voice-actors-test"
PER_PRINCIPAL = 3


@pytest.fixture(scope="module")
def sec_config(config):
    auth = config.auth.model_copy(update={
        "jwt_secret": SecretStr("security-jwt-secret-0123456789abcdef"),
        "device_secret": SecretStr("security-device-secret-0123456789ab"),
        "device_admission": "activation",
        "users": {"alice": UserConfig(password_hash=hash_password("wonderland", iterations=1000)),
                  "root": UserConfig(password_hash=hash_password("toor-toor", iterations=1000),
                                     roles=["user", "admin"])},
        "login_max_failures": 3, "ip_max_failures": 40, "failure_lock_s": 1.5, "failure_max_lock_s": 3,
    })
    limits = config.limits.model_copy(update={
        "requests_per_minute": 6000, "burst": 200, "max_live_sessions_per_principal": PER_PRINCIPAL,
        "max_json_bytes": 4096, "max_request_bytes": 400_000, "socket_idle_timeout_s": 3,
        "max_upload_seconds": 10,
    })
    session = config.session.model_copy(update={"idle_timeout_s": 4.0, "orphan_timeout_s": 2.0})
    return config.model_copy(update={"auth": auth, "limits": limits, "session": session})


@pytest.fixture(scope="module")
def server(ray_cluster, sec_config):
    yield from run_ingress(sec_config, "voice-actors-security")


@pytest.fixture(scope="module")
def auth(sec_config) -> Authenticator:
    return Authenticator(sec_config.auth)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def user(auth: Authenticator, name: str, roles: tuple[str, ...] = ("user",)) -> dict[str, str]:
    return bearer(auth.issue_token(name, roles))


async def closed_with(url: str, headers: dict[str, str] | None = None, *messages: str | bytes,
                      timeout: float = 10) -> tuple[int, str, list[Any]]:
    """Open a socket, send `messages`, read until the server closes it: → (code, reason, what came)."""
    got: list[Any] = []
    async with connect(url, additional_headers=headers, proxy=None, max_size=None) as ws:
        for m in messages:
            await ws.send(m)
        try:
            while True:
                got.append(await asyncio.wait_for(ws.recv(), timeout))
        except ConnectionClosed as e:
            return e.rcvd.code, e.rcvd.reason, got
    raise AssertionError("the socket was not closed by the server")


async def ota(http: httpx.AsyncClient, device: str) -> dict:
    r = await http.post(f"{BASE}/xiaozhi/ota/", headers={"Device-Id": device, "Client-Id": "client-" + device[-2:]},
                        json={"application": {"version": "1.7.0"}})
    assert r.status_code == 200, r.text
    return r.json()


async def wait_gone(session_id: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if hosted_session(session_id, NS) is None:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"session {session_id} still alive after {timeout} s")


# ------------------------------------------------------------------ 1. device admission
async def test_a_stranger_cannot_become_a_device_until_its_owner_activates_it(server, auth, sec_config):
    device = "02:aa:00:00:00:01"
    async with httpx.AsyncClient() as http:
        first = await ota(http, device)
        assert "websocket" not in first, "an unknown device must not get a token"
        code = first["activation"]["code"]
        assert len(code) == 6 and first["activation"]["challenge"] and code in first["activation"]["message"]
        assert (await ota(http, device))["activation"]["code"] == code  # the same code while it waits
        poll = await http.post(f"{BASE}/xiaozhi/ota/activate", headers={"Device-Id": device}, json={})
        assert poll.status_code == 202

        # a token for it (as if leaked) opens nothing while it is not admitted
        forged = auth.issue_device_token("client-01", device)
        xz = {"Device-Id": device, "Client-Id": "client-01", "Protocol-Version": "1", **bearer(forged)}
        assert (await closed_with(f"{WS}/xiaozhi/v1/", xz))[:2] == (4403, "auth.forbidden_device")

        # only a user can confirm, and only with the right code
        r = await http.post(f"{BASE}/api/devices/activate", json={"code": code}, headers=bearer(forged))
        assert r.status_code in (401, 403)
        wrong = "999999" if code != "999999" else "999998"
        r = await http.post(f"{BASE}/api/devices/activate", json={"code": wrong}, headers=user(auth, "alice"))
        assert r.status_code == 404 and r.json()["error"]["code"] == "device.unknown_code"
        r = await http.post(f"{BASE}/api/devices/activate", json={"code": code}, headers=user(auth, "alice"))
        assert r.status_code == 200 and r.json() == {"device_id": device, "owner": "user:alice", "activated": True}

        poll = await http.post(f"{BASE}/xiaozhi/ota/activate", headers={"Device-Id": device}, json={})
        assert poll.status_code == 200
        admitted = await ota(http, device)
        assert "activation" not in admitted and admitted["websocket"]["token"].startswith("dv1.")
        mine = await http.get(f"{BASE}/api/devices", headers=user(auth, "alice"))
        assert [d["device_id"] for d in mine.json()["devices"]] == [device]
        theirs = await http.get(f"{BASE}/api/devices", headers=user(auth, "mallory"))
        assert theirs.json()["devices"] == []
        everyone = await http.get(f"{BASE}/api/devices", headers=user(auth, "root", ("user", "admin")))
        assert device in [d["device_id"] for d in everyone.json()["devices"]]

        async with await XiaozhiClient.connect(admitted["websocket"]["url"], admitted["websocket"]["token"],
                                               device, client_id="client-01") as c:
            assert c.session_id

        # mallory cannot revoke alice's device; alice can, and then its token opens nothing
        r = await http.delete(f"{BASE}/api/devices/{device}", headers=user(auth, "mallory"))
        assert r.status_code == 404
        r = await http.delete(f"{BASE}/api/devices/{device}", headers=user(auth, "alice"))
        assert r.status_code == 200 and r.json()["revoked"] is True
        token = admitted["websocket"]["token"]
        assert (await closed_with(f"{WS}/xiaozhi/v1/", {**xz, **bearer(token)}))[:2] == (4403, "auth.forbidden_device")


@pytest.mark.parametrize("device_id", ["../../etc/passwd", "x" * 4000, "a%00b", "a b"])
async def test_ota_refuses_device_ids_outside_the_format(server, device_id):
    async with httpx.AsyncClient() as http:
        r = await http.post(f"{BASE}/xiaozhi/ota/?device-id={device_id}", json={})
    assert r.status_code == 400 and r.json()["error"]["code"] == "auth.bad_device_id"


async def test_a_second_socket_with_the_device_credentials_replaces_the_first(server, auth):
    """Finding 1: a second client joined the device's live session and heard it."""
    device = "02:aa:00:00:00:02"
    async with httpx.AsyncClient() as http:
        code = (await ota(http, device))["activation"]["code"]
        await http.post(f"{BASE}/api/devices/activate", json={"code": code}, headers=user(auth, "alice"))
        info = await ota(http, device)
    url, token = info["websocket"]["url"], info["websocket"]["token"]
    first = await XiaozhiClient.connect(url, token, device, client_id="client-02")
    try:
        second = await XiaozhiClient.connect(url, token, device, client_id="client-02")
        async with second:
            assert second.session_id == first.session_id  # the device's own session, taken over
            messages = []
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    messages.append(await asyncio.wait_for(first.ws.recv(), 10))
            assert closed.value.rcvd.code == 4409 and closed.value.rcvd.reason == "session.replaced"
            assert any(isinstance(m, str) and json.loads(m).get("code") == "session.replaced" for m in messages)
            await second.ws.send(json.dumps({"session_id": second.session_id, "type": "listen", "state": "start",
                                             "mode": "auto"}))
            await second.ws.ping()  # the survivor is still served
    finally:
        await first.ws.close()


async def test_a_user_token_cannot_speak_for_a_device(server, auth):
    """Finding 3: a user JWT connecting first as Device-Id D locked the real device out."""
    headers = {"Device-Id": "02:aa:00:00:00:03", "Client-Id": "c", "Protocol-Version": "1", **user(auth, "alice")}
    assert (await closed_with(f"{WS}/xiaozhi/v1/", headers))[:2] == (4403, "auth.device_token_required")


# ------------------------------------------------------------------ 2, 4, 5. ownership and ids
async def test_a_finished_conversation_stays_its_owners(server, auth):
    """Finding 2: after the actor ended, anyone naming the id read the history
    and the remembered facts."""
    alice, mallory = user(auth, "alice"), user(auth, "mallory")
    async with httpx.AsyncClient(timeout=60) as http:
        r = await http.post(f"{BASE}/api/text/process", headers=alice,
                            json={"text": "Remember that my door code is 4321."})
        sid = r.json()["session_id"]
        assert r.status_code == 200 and "4321" in r.json()["reply"]
        r = await http.post(f"{BASE}/api/voice/end", json={"session_id": sid}, headers=alice)
        assert r.status_code == 200
        await wait_gone(sid)

        r = await http.post(f"{BASE}/api/text/process", headers=mallory,
                            json={"text": "What is my door code?", "session_id": sid})
        assert r.status_code == 404 and r.json()["error"]["code"] == "session.not_found"
        never = await http.post(f"{BASE}/api/text/process", headers=mallory,
                                json={"text": "hello", "session_id": "0123456789abcdef"})
        assert never.status_code == 404 and never.json() == r.json()  # unknown and foreign answer alike
        r = await http.post(f"{BASE}/api/voice/start", headers=mallory, json={"session_id": sid})
        assert r.status_code == 404
        code, reason, got = await closed_with(f"{WS}/ws/voice", mallory,
                                              json.dumps({"type": "hello", "version": 1, "session_id": sid}))
        assert (code, reason) == (4404, "session.not_found") and not any("history" in str(m) for m in got)
        for route in (f"/api/session/validate/{sid}", "/api/session/validate/0123456789abcdef"):
            assert (await http.get(BASE + route, headers=mallory)).json()["valid"] is False
        r = await http.delete(f"{BASE}/api/session/{sid}", headers=mallory)
        assert r.status_code == 404

        ok = await http.get(f"{BASE}/api/session/validate/{sid}", headers=alice)
        assert ok.json()["valid"] is True and ok.json()["live"] is False
        r = await http.post(f"{BASE}/api/text/process", headers=alice,
                            json={"text": "What is my door code?", "session_id": sid})
        assert r.status_code == 200 and "4321" in r.json()["reply"]
        r = await http.delete(f"{BASE}/api/session/{sid}", headers=alice)
        assert r.status_code == 200
        assert (await http.get(f"{BASE}/api/session/validate/{sid}", headers=alice)).json()["valid"] is False


@pytest.mark.parametrize("session_id", ["../../etc/passwd", "a" * 20000, "a\x00b", "   ", "a.b", "é"])
async def test_text_stream_refuses_session_ids_outside_the_rules(server, auth, session_id):
    """Finding 5: /ws/text/stream accepted any id, and some could never be deleted."""
    code, reason, got = await closed_with(f"{WS}/ws/text/stream", user(auth, "alice"),
                                          json.dumps({"type": "text", "text": "hi", "session_id": session_id}))
    assert (code, reason) == (4400, "protocol.bad_session_id")


async def test_session_id_rules_on_http_routes(server, auth):
    alice = user(auth, "alice")
    async with httpx.AsyncClient() as http:
        for bad in ("..%2F..%2Fetc", "a" * 200, "a%00b", "a.b"):
            r = await http.delete(f"{BASE}/api/session/{bad}", headers=alice)
            assert r.status_code == 404, r.text  # a slash never reaches the route; the rest are not ids
            assert r.json()["error"]["code"] in ("session.not_found", "http.404")
        r = await http.post(f"{BASE}/api/audio/process?session_id=../x", headers={**alice, "Content-Type": "audio/wav"},
                            content=wav_bytes(b"\x00\x00" * 1600, 16000))
        assert r.status_code == 422


# ------------------------------------------------------------------ 6, 13. session caps and reaping
async def test_live_sessions_are_capped_per_principal_and_places_come_back(server, auth):
    """Finding 6: every POST /api/voice/start made a ~145 MB process, without a cap."""
    carol = user(auth, "carol")
    token = carol["Authorization"][7:]
    clients = []  # each session held by its socket, so none is reaped while the cap is tested
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            sids = []
            for _ in range(PER_PRINCIPAL):
                r = await http.post(f"{BASE}/api/voice/start", headers=carol, json={})
                assert r.status_code == 200, r.text
                sids.append(r.json()["session_id"])
                clients.append(await NativeClient.connect(f"{WS}/ws/voice", token, sids[-1]))
            r = await http.post(f"{BASE}/api/voice/start", headers=carol, json={})
            assert r.status_code == 429 and r.json()["error"]["code"] == "limit.live_sessions"
            code, reason, _ = await closed_with(f"{WS}/ws/voice", carol, json.dumps({"type": "hello", "version": 1}))
            assert (code, reason) == (4429, "limit.live_sessions")
            assert (await http.post(f"{BASE}/api/voice/start", headers=user(auth, "dave"), json={})).status_code == 200
            # resuming one of your own live sessions needs no new place
            r = await http.post(f"{BASE}/api/voice/start", headers=carol, json={"session_id": sids[0]})
            assert r.status_code == 200 and r.json()["resumed"] is True
            await clients.pop(0).close()
            await http.post(f"{BASE}/api/voice/end", headers=carol, json={"session_id": sids[0]})
            await wait_gone(sids[0])
            r = await http.post(f"{BASE}/api/voice/start", headers=carol, json={})
            assert r.status_code == 200
            sids.append(r.json()["session_id"])
    finally:
        for c in clients:
            await c.close()
    # sessions nobody is connected to end after orphan_timeout_s (2 s here), their conversation kept
    for sid in sids[1:]:
        await wait_gone(sid, timeout=20)
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.post(f"{BASE}/api/voice/start", headers=carol, json={})
        assert r.status_code == 200  # the reaped sessions gave their places back


async def test_the_warm_pool_hands_out_live_actors_after_a_quiet_spell(server, auth, sec_config):
    """Finding 13: warm actors reaped themselves after idle_timeout_s while the
    pool still held them as ready."""
    await asyncio.sleep(sec_config.session.idle_timeout_s * 2)
    async with httpx.AsyncClient(timeout=60) as http:
        health = (await http.get(f"{BASE}/health")).json()
        assert health["warm_sessions_ready"] >= 1
        started = time.monotonic()
        r = await http.post(f"{BASE}/api/text/process", headers=user(auth, "erin"), json={"text": "What is two plus two?"})
        assert r.status_code == 200 and "4" in r.json()["reply"], r.text
        assert time.monotonic() - started < 30


# ------------------------------------------------------------------ 7, 8. sizes before work
async def test_a_wav_claiming_one_hertz_is_refused_before_decoding(server, auth):
    """Finding 7: an 8 KB upload whose header said 1 Hz allocated 1.2 GB."""
    bomb = bytearray(wav_bytes(b"\x01\x00" * 4096, 16000))
    bomb[24:28] = (1).to_bytes(4, "little")  # sample rate
    bomb[28:32] = (2).to_bytes(4, "little")  # byte rate
    zero = bytearray(bomb)
    zero[24:28] = (0).to_bytes(4, "little")
    async with httpx.AsyncClient(timeout=30) as http:
        for body in (bytes(bomb), bytes(zero)):
            r = await http.post(f"{BASE}/api/audio/stt", content=body,
                                headers={**user(auth, "alice"), "Content-Type": "audio/wav"})
            assert r.status_code == 415 and r.json()["error"]["code"] == "audio.unsupported_format", r.text
        r = await http.post(f"{BASE}/api/audio/stt?sample_rate=%C2%B2", content=b"\x00\x00" * 1600,
                            headers={**user(auth, "alice"), "Content-Type": "audio/l16"})
        assert r.status_code == 422 and r.json()["error"]["code"] == "request.invalid"
        long = wav_bytes(b"\x00\x00" * 16000 * 11, 16000)[:390_000]  # header says 11 s; the limit is 10
        r = await http.post(f"{BASE}/api/audio/stt", content=long,
                            headers={**user(auth, "alice"), "Content-Type": "audio/wav"})
        assert r.status_code == 415, r.text


async def test_bodies_over_the_limit_are_refused_from_the_declared_length(server, auth):
    """Finding 8: a 40 MB login body was read and parsed."""
    async with httpx.AsyncClient(timeout=30) as http:
        big = json.dumps({"username": "alice", "password": "x" * 5_000_000})
        r = await http.post(f"{BASE}/api/auth/login", content=big, headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "limit.too_large"

        async def chunks():  # no Content-Length: counted while it streams
            for _ in range(100):
                yield b"x" * 10_000

        r = await http.post(f"{BASE}/api/audio/stt", content=chunks(),
                            headers={**user(auth, "alice"), "Content-Type": "audio/wav"})
        assert r.status_code == 413, r.text
        assert r.status_code == 413 and r.json()["error"]["code"] == "limit.too_large"
        r = await http.post(f"{BASE}/api/auth/login", content=b"{", headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "request.bad_json"


# ------------------------------------------------------------------ 9. idle sockets
async def test_a_socket_that_goes_quiet_after_hello_is_closed(server, auth, sec_config):
    started = time.monotonic()
    code, reason, got = await closed_with(f"{WS}/ws/voice", user(auth, "alice"),
                                          json.dumps({"type": "hello", "version": 1}))
    waited = time.monotonic() - started
    assert (code, reason) == (4408, "protocol.idle_timeout")
    assert waited >= sec_config.limits.socket_idle_timeout_s
    assert json.loads(got[-1])["code"] == "protocol.idle_timeout"


async def test_a_socket_in_use_is_not_idle(server, auth, sec_config):
    async with await NativeClient.connect(f"{WS}/ws/voice", auth.issue_token("alice")) as c:
        for _ in range(3):  # longer than the idle limit in all, never idle for it
            await c.send_json({"type": "ping", "id": 1})
            await asyncio.sleep(sec_config.limits.socket_idle_timeout_s * 0.6)
        assert "4" in (await c.ask_text("What is two plus two?")).reply


# ------------------------------------------------------------------ 11, 12. crashes on bad input
async def test_hostile_json_on_every_socket_gets_an_error_and_the_socket_lives(server, auth):
    deep = "[" * 5000 + "]" * 5000
    hostile = [deep, '{"type": "text", "text": 1' + "0" * 5000 + "}", '{"type": "text", "text": "\\ud800"}',
               '{"type": "ping", "id": NaN}', '{"type": "ping", "id": Infinity}']
    async with await NativeClient.connect(f"{WS}/ws/voice", auth.issue_token("alice")) as c:
        for msg in hostile:
            await c.ws.send(msg)
            reply = json.loads(await asyncio.wait_for(c.ws.recv(), 10))
            assert reply["type"] == "error" and reply["code"].startswith("protocol."), reply
        assert "4" in (await c.ask_text("What is two plus two?")).reply
    async with connect(f"{WS}/ws/text/stream", additional_headers=user(auth, "alice"), proxy=None) as ws:
        await ws.send(json.dumps({"type": "ping", "id": 1}))
        for msg in hostile:
            await ws.send(msg)
        kinds = []
        while len(kinds) < 2 + len(hostile):
            kinds.append(json.loads(await asyncio.wait_for(ws.recv(), 10))["type"])
        assert kinds.count("error") == len(hostile)


@pytest.mark.parametrize("value", ['"abc"', '""', "null", "[]", "{}", "1e999", "true"])
async def test_xiaozhi_hello_with_nonsense_audio_params_is_refused_cleanly(server, auth, value):
    device = "02:aa:00:00:00:04"
    async with httpx.AsyncClient() as http:
        info = await ota(http, device)
        if "activation" in info:
            await http.post(f"{BASE}/api/devices/activate", json={"code": info["activation"]["code"]},
                            headers=user(auth, "alice"))
            info = await ota(http, device)
    headers = {"Device-Id": device, "Client-Id": "client-04", "Protocol-Version": "1",
               **bearer(info["websocket"]["token"])}
    hello = ('{"type": "hello", "version": 1, "transport": "websocket", "audio_params": '
             '{"format": "opus", "sample_rate": %s, "channels": 1}}' % value)
    code, reason, _ = await closed_with(f"{WS}/xiaozhi/v1/", headers, hello)
    assert code == 4400 and reason in ("audio.unsupported_format", "protocol.bad_hello", "protocol.bad_json")


@pytest.mark.parametrize("version", ["²", "9" * 5000, "-1", ""])
async def test_odd_protocol_versions_are_refused_cleanly(server, version):
    code, reason, _ = await closed_with(f"{WS}/xiaozhi/v1/", {"Device-Id": "02:aa:00:00:00:05",
                                                              "Protocol-Version": version})
    if version == "":
        assert code in (4401, 4403)  # an empty header means version 1: the token check answers
    else:
        assert (code, reason) == (4400, "xiaozhi.bad_version")


async def test_odd_ota_bodies_and_framework_errors_use_the_error_envelope(server):
    async with httpx.AsyncClient() as http:
        for body in ('{"application": "x"}', "[1, 2]", '"text"', "{}"):
            r = await http.post(f"{BASE}/xiaozhi/ota/", content=body,
                                headers={"Device-Id": "02:aa:00:00:00:06", "Content-Type": "application/json"})
            assert r.status_code == 200 and "activation" in r.json(), (body, r.text)
        r = await http.post(f"{BASE}/xiaozhi/ota/", content="[" * 2000 + "]" * 2000,
                            headers={"Device-Id": "02:aa:00:00:00:06", "Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "request.bad_json"
        r = await http.get(f"{BASE}/no/such/route")
        assert r.status_code == 404 and r.json()["error"]["code"] == "http.404"
        r = await http.put(f"{BASE}/api/auth/login", json={})
        assert r.status_code == 405 and r.json()["error"]["code"] == "http.405"
        r = await http.post(f"{BASE}/api/auth/login", content=b"username=a",
                            headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert r.status_code == 422 and "error" in r.json() and "detail" not in r.json()


# ------------------------------------------------------------------ 10. brute force (last: it locks this address)
async def test_password_guessing_is_locked_out_with_back_off(server, sec_config):
    async with httpx.AsyncClient() as http:
        codes = []
        for _ in range(sec_config.auth.login_max_failures + 2):
            r = await http.post(f"{BASE}/api/auth/login", json={"username": "alice", "password": "guess"})
            codes.append(r.status_code)
        assert codes[:sec_config.auth.login_max_failures] == [401] * sec_config.auth.login_max_failures
        assert codes[-1] == 429 and r.json()["error"]["code"] == "limit.auth_failures"
        assert int(r.headers["Retry-After"]) >= 1
        locked = await http.post(f"{BASE}/api/auth/login", json={"username": "alice", "password": "wonderland"})
        assert locked.status_code == 429  # even the right password waits out the lock
        other = await http.post(f"{BASE}/api/auth/login", json={"username": "root", "password": "toor-toor"})
        assert other.status_code == 200  # another user is not locked out by alice's guesser
        await asyncio.sleep(sec_config.auth.failure_max_lock_s + 0.5)
        ok = await http.post(f"{BASE}/api/auth/login", json={"username": "alice", "password": "wonderland"})
        assert ok.status_code == 200


async def test_forged_tokens_from_one_address_are_locked_out(server, auth, sec_config):
    async with httpx.AsyncClient() as http:
        codes = [(await http.get(f"{BASE}/api/auth/me", headers=bearer(f"forged.{i}.token"))).status_code
                 for i in range(sec_config.auth.ip_max_failures + 2)]
        assert codes[0] == 401 and codes[-1] == 429
        r = await http.get(f"{BASE}/api/auth/me", headers=user(auth, "alice"))
        assert r.status_code == 429 and r.json()["error"]["code"] == "limit.auth_failures"
    code, reason, _ = await closed_with(f"{WS}/ws/voice", user(auth, "alice"))
    assert (code, reason) == (4429, "limit.auth_failures")
    await asyncio.sleep(sec_config.auth.failure_max_lock_s + 0.5)
