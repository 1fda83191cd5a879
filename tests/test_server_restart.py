"""Issue 10: memory and conversations outlive a whole server restart.

"Restart" here stops every process that held a user's state: Serve itself
(controller, proxy, the ingress replica with its memory store and device
registry handles), every session actor (warm ones too) and the session
directory. Only the databases (`session.history_db`, `memory.url`, in this
module's own directory) carry anything over; the provider pools that
survive hold models, never a user's data. Then the same config is served
again, as a reboot would. The LLM is the fake OpenAI server, so what a
session remembered is read where it matters: in the system prompt the LLM
gets. A device's memories belong to the device (`device:<id>`); its owner
manages them under `/api/devices/{id}/memories`.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray
from pydantic import SecretStr

from actors.client import XiaozhiClient
from actors.ingress.auth import Authenticator
from tests.conftest import INGRESS_PORT, TEST_NAMESPACE, hosted_session, served_config
from tests.fakes.openai_server import FakeOpenAIServer, Script

APP = "voice-actors-restart"
BASE = f"http://127.0.0.1:{INGRESS_PORT}"
KEY = "sk-test-restart-0123456789"
DEVICE = "02:00:00:00:10:01"
MEMORY_BLOCK = "What you remember about this user"


@pytest.fixture(scope="module")
def llm() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(api_key=KEY) as fake:
        fake.default = Script.text("Noted.")
        yield fake


@pytest.fixture(scope="module")
def restart_config(config: Any, llm: FakeOpenAIServer) -> Any:
    """This module's own databases (so nothing another module left can
    answer for them), the fake LLM, and devices admitted by activation: the
    device gets an owner, who may then manage its memories."""
    from actors.config import LLMConfig

    data = Path(tempfile.mkdtemp(prefix="va-restart-"))
    llm_cfg = LLMConfig.model_validate({**config.llm.model_dump(), "provider": "openai-compatible",
                                        "openai_compat": {"base_url": llm.base_url, "api_key": KEY,
                                                          "model": "qwen-plus"}})
    cfg = served_config(config, [], "activation")
    return cfg.model_copy(update={
        "llm": llm_cfg,
        "session": cfg.session.model_copy(update={"history_db": str(data / "history.sqlite3")}),
        "memory": cfg.memory.model_copy(update={"url": f"sqlite:///{data / 'memory.sqlite3'}"}),
        "auth": cfg.auth.model_copy(update={"jwt_secret": SecretStr("restart-jwt-secret-0123456789abcdef")}),
    })


def stateful_actors() -> list[str]:
    """Every named actor that holds a user's state between requests: session
    actors and the directory of live sessions and device aliases."""
    from actors.session_directory import directory_name
    from actors.session_ref import HOST_PREFIX

    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == TEST_NAMESPACE
            and (a["name"].startswith(HOST_PREFIX) or a["name"] == directory_name())]


def serve_processes() -> list[str]:
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("SERVE_")]


def stop_everything() -> None:
    """Serve and every stateful actor gone, as after a power cut: killed, not
    asked to save anything on the way out."""
    from ray import serve

    serve.shutdown()
    for name in stateful_actors():
        try:
            ray.kill(ray.get_actor(name, namespace=TEST_NAMESPACE), no_restart=True)
        except ValueError:
            pass  # went by itself meanwhile
    deadline = time.monotonic() + 30
    while (stateful_actors() or serve_processes()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not stateful_actors() and not serve_processes(), (stateful_actors(), serve_processes())


def start(config: Any) -> None:
    from ray import serve

    from serve_app import build_app

    serve.start(http_options={"host": "127.0.0.1", "port": INGRESS_PORT})
    serve.run(build_app(config), name=APP, route_prefix="/")


@pytest.fixture(scope="module")
def server(ray_cluster: Any, restart_config: Any) -> Iterator[Callable[[], None]]:
    """Serves the module's config from nothing but its databases; yields the
    restart. The directory and sessions go first and last, so that no other
    module shares them: they are made with a module's own database."""
    stop_everything()
    start(restart_config)

    def restart() -> None:
        stop_everything()
        start(restart_config)

    yield restart
    stop_everything()  # the next module's run_ingress starts Serve again


@pytest.fixture(scope="module")
def auth(restart_config: Any) -> Authenticator:
    return Authenticator(restart_config.auth)


def bearer(auth: Authenticator, user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {auth.issue_token(user)}"}


async def ask(http: httpx.AsyncClient, headers: dict[str, str], text: str, llm: FakeOpenAIServer) -> dict[str, Any]:
    """One typed turn in a new session → the request the LLM got for it."""
    before = len(llm.requests)
    r = await http.post(f"{BASE}/api/text/process", headers=headers, json={"text": text})
    assert r.status_code == 200, r.text
    [request] = llm.requests[before:]
    assert request.messages[-1] == {"role": "user", "content": text}
    return {"session_id": r.json()["session_id"], "system": request.messages[0]["content"],
            "messages": request.messages}


async def memories(http: httpx.AsyncClient, url: str, headers: dict[str, str], want: int) -> list[dict[str, Any]]:
    """The memories at `url` once there are `want` (a memory is written beside the reply, not before it)."""
    for _ in range(100):
        r = await http.get(url, headers=headers)
        assert r.status_code == 200, r.text
        if len(found := r.json()["memories"]) == want:
            return found
        await asyncio.sleep(0.1)
    raise AssertionError(f"{url}: {found}, not {want} memories")


async def device_socket(http: httpx.AsyncClient, owner: dict[str, str]) -> tuple[str, str]:
    """The device's socket URL and token; the first time, `owner` activates it with the code it shows."""
    ota = {"Device-Id": DEVICE, "Client-Id": DEVICE}
    r = await http.post(f"{BASE}/xiaozhi/ota/", headers=ota, json={"application": {"version": "1.6.0"}})
    assert r.status_code == 200, r.text
    if "activation" in r.json():
        code = r.json()["activation"]["code"]
        activated = await http.post(f"{BASE}/api/devices/activate", headers=owner, json={"code": code})
        assert activated.status_code == 200, activated.text
        r = await http.post(f"{BASE}/xiaozhi/ota/", headers=ota, json={"application": {"version": "1.6.0"}})
    ws = r.json()["websocket"]
    return ws["url"], ws["token"]


async def device_says(http: httpx.AsyncClient, owner: dict[str, str], text: str,
                      llm: FakeOpenAIServer) -> tuple[str, Any]:
    """One typed turn from the device (wake-word text, as the firmware sends
    it) → its session id and the request the LLM got."""
    url, token = await device_socket(http, owner)
    before = len(llm.requests)
    async with await XiaozhiClient.connect(url, token, DEVICE, client_id=DEVICE, version=3) as c:
        await c.send_json({"type": "listen", "state": "detect", "text": text})
        while True:
            data = await asyncio.wait_for(c.ws.recv(), 60)
            if isinstance(data, str) and (m := json.loads(data))["type"] == "tts" and m.get("state") == "stop":
                break
        sid = c.session_id
    [request] = [r for r in llm.requests[before:] if r.messages[-1].get("content") == text]
    return sid, request


async def stored_history(config: Any, sid: str, text: str) -> None:
    """Wait until the session's turn with `text` is in the store: a restart
    right after a reply must not be what the test measures."""
    from actors.history_store import HistoryStore

    store = HistoryStore.from_config(config)
    assert store is not None
    try:
        for _ in range(100):
            history, _ = await store.load(sid)
            if any(m.role == "user" and m.content == text for m in history):
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"the turn never reached the store: {history}")
    finally:
        await store.close()


async def test_memories_and_a_devices_conversation_survive_a_server_restart(server, auth, llm, restart_config):
    alice, bob = bearer(auth, "restart-alice"), bearer(auth, "restart-bob")
    told = "Remember that my locker code is 4711."
    device_told = "Remember that my favourite exhibit is the Rosetta Stone."
    async with httpx.AsyncClient(timeout=60) as http:
        await ask(http, alice, told, llm)
        [fact] = await memories(http, f"{BASE}/api/memories", alice, 1)
        assert "4711" in fact["text"]
        device_sid, _ = await device_says(http, alice, device_told, llm)
        [device_fact] = await memories(http, f"{BASE}/api/devices/{DEVICE}/memories", alice, 1)
        assert "Rosetta Stone" in device_fact["text"]
        await stored_history(restart_config, device_sid, device_told)

    from actors.session_directory import directory_name

    old_sessions = [n for n in stateful_actors() if n != directory_name()]
    assert hosted_session(device_sid) is not None and old_sessions
    server()  # the restart
    assert not any(n in stateful_actors() for n in old_sessions)

    async with httpx.AsyncClient(timeout=60) as http:
        # the user's next session, on a server that never saw them, has the fact in its prompt
        later = await ask(http, alice, "What is my locker code?", llm)
        assert MEMORY_BLOCK in later["system"] and "4711" in later["system"], later["system"]
        assert [m["id"] for m in await memories(http, f"{BASE}/api/memories", alice, 1)] == [fact["id"]]
        # another user never sees it, in a prompt or over HTTP
        other = await ask(http, bob, "What is my locker code?", llm)
        assert "4711" not in json.dumps(other["messages"]), other
        assert (await http.get(f"{BASE}/api/memories", headers=bob)).json()["memories"] == []

        # the device gets its session back with its conversation, and its memory in the prompt
        sid, request = await device_says(http, alice, "Which exhibit do I like best?", llm)
        assert sid == device_sid
        assert {"role": "user", "content": device_told} in request.messages, request.messages
        system = request.messages[0]["content"]
        assert MEMORY_BLOCK in system and "Rosetta Stone" in system, system

        # deleted: gone from the list and from every later prompt
        gone = await http.delete(f"{BASE}/api/memories/{fact['id']}", headers=alice)
        assert gone.status_code == 200, gone.text
        assert (await http.get(f"{BASE}/api/memories", headers=alice)).json()["memories"] == []
        after = await ask(http, alice, "What is my locker code?", llm)
        assert "4711" not in after["system"], after["system"]
        wiped = await http.delete(f"{BASE}/api/devices/{DEVICE}/memories", headers=alice)
        assert wiped.status_code == 200 and wiped.json() == {"deleted": 1}, wiped.text
        _, request = await device_says(http, alice, "Do you remember anything about me?", llm)
        assert "Rosetta Stone" not in request.messages[0]["content"]


async def test_only_a_devices_owner_manages_what_it_remembered(server, auth, llm):
    alice, mallory = bearer(auth, "restart-alice"), bearer(auth, "restart-mallory")
    admin = {"Authorization": f"Bearer {auth.issue_token('restart-root', roles=('user', 'admin'))}"}
    device_url = f"{BASE}/api/devices/{DEVICE}/memories"
    async with httpx.AsyncClient(timeout=60) as http:
        await device_says(http, alice, "Remember that the kitchen light is blue.", llm)
        [fact] = await memories(http, device_url, alice, 1)
        assert fact["text"] == "the kitchen light is blue", fact
        # the device's memories are not the owner's own
        assert all("kitchen" not in m["text"]
                   for m in (await http.get(f"{BASE}/api/memories", headers=alice)).json()["memories"])
        export = await http.get(f"{device_url}/export", headers=alice)
        assert export.status_code == 200 and "attachment" in export.headers["content-disposition"]
        assert [m["text"] for m in export.json()["memories"]] == ["the kitchen light is blue"]
        # someone else's device answers like an unknown one, for every verb
        for method, url in (("GET", device_url), ("GET", f"{device_url}/export"), ("DELETE", device_url),
                            ("DELETE", f"{device_url}/{fact['id']}"),
                            ("GET", f"{BASE}/api/devices/02:00:00:00:10:99/memories")):
            r = await http.request(method, url, headers=mallory if "10:99" not in url else alice)
            assert r.status_code == 404 and r.json()["error"]["code"] == "device.not_found", (method, url, r.text)
        assert (await http.get(device_url)).status_code == 401
        bad = await http.get(f"{BASE}/api/devices/bad%20id/memories", headers=alice)
        assert bad.status_code == 400, bad.text
        assert [m["id"] for m in (await http.get(device_url, headers=admin)).json()["memories"]] == [fact["id"]]
        # still there after mallory's tries; the owner forgets it
        assert (await http.delete(f"{device_url}/{fact['id']}", headers=alice)).json() == {"deleted": fact["id"]}
        assert (await http.get(device_url, headers=alice)).json()["memories"] == []


async def test_revoking_a_device_forgets_what_it_said_and_remembered(server, auth, llm):
    """A device handed on (revoked, then activated by someone else) must not
    bring its last owner's conversation or memories to the new one."""
    alice, carol = bearer(auth, "restart-alice"), bearer(auth, "restart-carol")
    told = "Remember that the spare key is under the blue pot."
    async with httpx.AsyncClient(timeout=60) as http:
        sid, _ = await device_says(http, alice, told, llm)
        await memories(http, f"{BASE}/api/devices/{DEVICE}/memories", alice, 1)
        r = await http.delete(f"{BASE}/api/devices/{DEVICE}", headers=alice)
        assert r.status_code == 200, r.text
        assert r.json() == {"device_id": DEVICE, "revoked": True, "history_deleted": True,
                            "memories_deleted": 1}, r.json()
        # carol activates the same device: nothing of alice's reaches her model or her list
        new_sid, request = await device_says(http, carol, "What do you know about me?", llm)
        assert "blue pot" not in json.dumps(request.messages), request.messages
        assert (await http.get(f"{BASE}/api/devices/{DEVICE}/memories", headers=carol)).json()["memories"] == []
        assert (await http.get(f"{BASE}/api/devices/{DEVICE}/memories", headers=alice)).status_code == 404
