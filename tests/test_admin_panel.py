"""The control panel (issue 11): the admin API through the real Serve proxy,
and web/admin.html in a real headless Chromium (Playwright). A session on the
cloud LLM (the loopback OpenAI-compatible fake, tests/fakes) trips its own
circuit breaker, and the panel shows it open.

The browser tests need Debian's `chromium` (tests/system-deps.sh) and the
`playwright` package; without them they fail, naming what is missing, unless
VA_ALLOW_NO_BROWSER=1 is set (then they skip, saying so).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from pathlib import Path

import httpx
import pytest
import ray
from pydantic import SecretStr
from websockets.exceptions import ConnectionClosed

from actors.audio import silence
from actors.client import NativeClient, XiaozhiClient
from actors.config import UserConfig
from actors.history_store import HistoryStore
from actors.ingress.admin import MASK, mask_config
from actors.ingress.auth import Authenticator, hash_password
from actors.sessions import find_session, new_session_id, open_session
from tests.browser import find_chromium, wait_for_js
from tests.conftest import INGRESS_PORT, run_ingress
from tests.fakes.openai_server import FakeOpenAIServer, Script

BASE = f"http://127.0.0.1:{INGRESS_PORT}"
WS = f"ws://127.0.0.1:{INGRESS_PORT}"
QUESTION = "What is twelve times seven?"
DEVICE = "02:ad:00:00:00:11"
LLM_KEY = "sk-test-admin-llm-0123456789"
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "control-panel.png"

PLANTED = {
    "jwt": "admin-test-jwt-PLANTED-secret-0123456789abcdef",
    "device": "admin-test-device-PLANTED-secret-0123456789",
    "llm": "sk-PLANTED-llm-key-5f3a9c11",
    "stt": "sk-PLANTED-stt-key-77c1d0e2",
    "tts": "sk-PLANTED-tts-key-a0e4b2f3",
}
"""Known secret values put into the served configuration: none may appear in /api/admin/config."""

ADMIN_ROUTES = [
    ("GET", "/api/admin/overview"), ("GET", "/api/admin/sessions"), ("GET", "/api/admin/sessions/abc123"),
    ("POST", "/api/admin/sessions/abc123/end"), ("DELETE", "/api/admin/sessions/abc123"),
    ("GET", "/api/admin/pools"), ("GET", "/api/admin/errors"), ("GET", "/api/admin/series"),
    ("GET", "/api/admin/config"),
]


@pytest.fixture(scope="module")
def server_config(config):
    alice_hash = hash_password("wonderland", iterations=1000)
    auth = config.auth.model_copy(update={
        "jwt_secret": SecretStr(PLANTED["jwt"]), "device_secret": SecretStr(PLANTED["device"]),
        "users": {"alice": UserConfig(password_hash=alice_hash, roles=["user", "admin"])},
        "device_allowlist": [DEVICE], "device_admission": "allowlist",
    })
    limits = config.limits.model_copy(update={"requests_per_minute": 6000, "burst": 400,
                                              "max_live_sessions_per_principal": 64})
    # vendor sections of providers outside the chains: shown (validated) in the config, never used
    llm = config.llm.model_copy(update={"openai_compat": {"api_key": PLANTED["llm"], "model": "qwen-plus"}})
    stt = config.stt.model_copy(update={"dashscope": {"api_key": PLANTED["stt"]}})
    tts = config.tts.model_copy(update={"dashscope": {"api_key": PLANTED["tts"]}})
    PLANTED["password_hash"] = alice_hash
    return config.model_copy(update={"auth": auth, "limits": limits, "llm": llm, "stt": stt, "tts": tts})


@pytest.fixture(scope="module")
def server(ray_cluster, server_config):
    yield from run_ingress(server_config, "voice-actors-admin-test")


@pytest.fixture(scope="module")
def auth(server_config) -> Authenticator:
    return Authenticator(server_config.auth)


@pytest.fixture(scope="module")
def admin_token(auth) -> str:
    return auth.issue_token("root", roles=("user", "admin"))


@pytest.fixture(scope="module")
def user_token(auth) -> str:
    return auth.issue_token("bob")


@pytest.fixture(scope="module")
def store(server_config) -> HistoryStore:
    store = HistoryStore.from_config(server_config)
    assert store is not None
    return store


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def admin_get(token: str, path: str) -> dict:
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.get(f"{BASE}{path}", headers=bearer(token))
    assert r.status_code == 200, r.text
    return r.json()


async def wait_closed(client: NativeClient, timeout_s: float = 15.0) -> None:
    """Read until the server closes the socket (fails if it stays open)."""
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            await asyncio.wait_for(client.ws.recv(), max(0.05, deadline - time.monotonic()))
    except (ConnectionClosed, asyncio.TimeoutError) as e:
        if isinstance(e, ConnectionClosed):
            return
    raise AssertionError("the session's socket stayed open after the session was ended")


async def wait_gone(config, session_id: str, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while await find_session(config, session_id) is not None:
        assert time.monotonic() < deadline, f"session actor {session_id} still alive"
        await asyncio.sleep(0.2)


# ------------------------------------------------------------------ roles, on the server
async def test_every_admin_route_refuses_users_and_anonymous(server, user_token):
    async with httpx.AsyncClient(timeout=30) as http:
        for method, path in ADMIN_ROUTES:
            r = await http.request(method, f"{BASE}{path}")
            assert r.status_code == 401, (method, path, r.text)
            assert r.json()["error"]["code"] == "auth.missing_token"
            assert r.headers.get("www-authenticate") == "Bearer"
            r = await http.request(method, f"{BASE}{path}", headers=bearer(user_token))
            assert r.status_code == 403, (method, path, r.text)
            assert r.json()["error"]["code"] == "auth.forbidden"
            assert "admin role" in r.json()["error"]["message"]
            r = await http.request(method, f"{BASE}{path}", headers=bearer("not-a-token"))
            assert r.status_code == 401 and r.json()["error"]["code"] == "auth.bad_token", (method, path)


async def test_the_page_is_served_without_data(server):
    async with httpx.AsyncClient(timeout=30) as http:
        page = await http.get(f"{BASE}/admin")
        js = await http.get(f"{BASE}/web/admin.js")
        css = await http.get(f"{BASE}/web/admin.css")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "control panel" in page.text and "/web/admin.js" in page.text and "/web/admin.css" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")


# ------------------------------------------------------------------ sessions: see, read, end, forget
async def test_admin_sees_reads_ends_and_forgets_a_session(server, server_config, admin_token, user_token, store):
    client = await NativeClient.connect(f"{WS}/ws/voice", user_token)
    sid = client.session_id
    try:
        turn = await client.ask_text(QUESTION)
        assert "84" in turn.reply

        listing = await admin_get(admin_token, "/api/admin/sessions")
        rows = {r["session_id"]: r for r in listing["sessions"]}
        assert sid in rows, listing
        row = rows[sid]
        assert row["owner"] == "user:bob" and row["owner_kind"] == "user"
        assert row["persona"] == server_config.default_persona
        assert row["state"] in ("idle", "listening", "replying")
        assert row["turns"] >= 1 and row["age_s"] >= 0 and row["clients"] >= 1 and not row["warm"]
        assert isinstance(row["node_id"], str) and len(row["node_id"]) >= 8
        assert row["node_id"] == ray.get_runtime_context().get_node_id()  # one node in the tests
        assert listing["count"] >= 1

        transcript = await admin_get(admin_token, f"/api/admin/sessions/{sid}")
        assert transcript["live"] is True and transcript["owner"] == "user:bob"
        said = [(m["role"], m["content"]) for m in transcript["messages"]]
        assert ("user", QUESTION) in said
        assert any(role == "assistant" and "84" in text for role, text in said), said

        async with httpx.AsyncClient(timeout=30) as http:
            r = await http.post(f"{BASE}/api/admin/sessions/{sid}/end", headers=bearer(admin_token))
        assert r.status_code == 200 and r.json()["ended"] is True, r.text
        await wait_closed(client)
        await wait_gone(server_config, sid)
    finally:
        await client.close()

    listing = await admin_get(admin_token, "/api/admin/sessions")
    assert sid not in {r["session_id"] for r in listing["sessions"]}
    stored = await admin_get(admin_token, f"/api/admin/sessions/{sid}")  # ended: the store still has it
    assert stored["live"] is False and any("84" in m["content"] for m in stored["messages"])
    assert await store.known(sid)

    async with httpx.AsyncClient(timeout=30) as http:
        again = await http.post(f"{BASE}/api/admin/sessions/{sid}/end", headers=bearer(admin_token))
        forget = await http.delete(f"{BASE}/api/admin/sessions/{sid}", headers=bearer(admin_token))
        gone = await http.get(f"{BASE}/api/admin/sessions/{sid}", headers=bearer(admin_token))
        bad = await http.get(f"{BASE}/api/admin/sessions/not%20an%20id", headers=bearer(admin_token))
    assert again.status_code == 404 and again.json()["error"]["code"] == "session.not_found"
    assert forget.status_code == 200 and forget.json()["history_deleted"] is True, forget.text
    assert not await store.known(sid)
    assert gone.status_code == 404 and bad.status_code == 404


async def test_forget_ends_a_live_session_too(server, server_config, admin_token, user_token, store):
    async with await NativeClient.connect(f"{WS}/ws/voice", user_token) as client:
        sid = client.session_id
        await client.ask_text("Remember that my locker is number nine.")
        assert await store.known(sid)
        async with httpx.AsyncClient(timeout=30) as http:
            r = await http.delete(f"{BASE}/api/admin/sessions/{sid}", headers=bearer(admin_token))
        assert r.status_code == 200 and r.json() == {"session_id": sid, "ended": True, "history_deleted": True}
        await wait_closed(client)
    await wait_gone(server_config, sid)
    assert not await store.known(sid)


# ------------------------------------------------------------------ providers, errors, series, config
async def _stt_seen(admin_token: str) -> tuple[float, float]:
    """(failures, calls in flight) live sessions report of the primary STT
    provider. Sessions of modules run before this one may still be live, theirs
    included (a failure they saw, or a stream in flight)."""
    pools = await admin_get(admin_token, "/api/admin/pools")
    primary = pools["chains"]["stt"][0]
    row = next((p for p in pools["providers"] if (p["kind"], p["provider"]) == ("stt", primary)), None)
    return (row["failures"], row["in_flight"]) if row else (0, 0)


async def test_series_errors_and_pools_after_a_turn_and_an_error(server, server_config, admin_token, user_token, speech):
    failures_before, in_flight_before = await _stt_seen(admin_token)
    async with await NativeClient.connect(f"{WS}/ws/voice", user_token) as client:
        sid = client.session_id
        turn = await client.ask_audio(silence(300) + speech(QUESTION), realtime=False)
        assert "84" in turn.reply
        await client.send_json({"type": "text", "text": "   "})  # provoked: text.empty
        error = await client.receive_turn(until="error", timeout_s=20)
        assert error.errors and error.errors[-1]["code"] == "text.empty"

        errors = await admin_get(admin_token, "/api/admin/errors")
        assert errors["kept"] >= 100 and isinstance(errors["errors"], list)
        mine = [e for e in errors["errors"] if e["session_id"] == sid]
        assert mine and mine[0]["code"] == "text.empty" and mine[0]["kind"] == "session"
        assert mine[0]["message"] == "text message is empty" and mine[0]["turn_id"] >= 0
        assert abs(mine[0]["ts"] - time.time()) < 120
        assert set(mine[0]) == {"ts", "kind", "code", "message", "session_id", "turn_id"}
        stamps = [e["ts"] for e in errors["errors"]]
        assert stamps == sorted(stamps, reverse=True)  # newest first

        series = await admin_get(admin_token, "/api/admin/series")
        assert series["period_s"] > 0 and series["window_s"] > 0
        assert series["stages"] == ["first_audio", "stt_final", "llm_first_token", "tts_first_audio"]
        points = series["points"]
        assert points and all(set(p) == {"t", "live_sessions", "sockets", "latency_ms"} for p in points)
        assert [p["t"] for p in points] == sorted(p["t"] for p in points)
        last = points[-1]
        assert last["live_sessions"] >= 1 and last["sockets"] >= 1
        for stage in ("first_audio", "stt_final", "llm_first_token"):
            figures = last["latency_ms"][stage]
            assert figures["n"] >= 1 and 0 < figures["p50"] <= figures["p90"] <= figures["p99"] < 60_000, (stage, last)

        pools = await admin_get(admin_token, "/api/admin/pools")
        by_kind = {p["kind"]: p for p in pools["pools"]}
        assert set(by_kind) == {"stt", "tts"} and pools["chains"]["llm"][0] == "local-dialogue"
        stt = by_kind["stt"]
        assert stt["ok"] and stt["calls"] >= 1 and stt["nodes"]
        node = stt["nodes"][0]
        assert node["in_flight"] == 0 and node["max_concurrency"] >= 1 and node["failures"] == 0  # the turn ended
        assert node["latency_ms"]["p50"] > 0 and node["latency_ms"]["mean"] > 0
        # every provider of the chains has a row, with what the live sessions saw of it
        providers = {(p["kind"], p["provider"]): p for p in pools["providers"]}
        chained = {(kind, name) for kind, names in pools["chains"].items() for name in names}
        assert chained <= set(providers), (chained, list(providers))
        for (kind, name), p in providers.items():
            if (kind, name) in chained:
                assert p["role"] == ("primary" if pools["chains"][kind][0] == name else "fallback"), p
        whisper = providers[("stt", stt["provider"])]
        assert whisper["state"] == "closed" and whisper["sessions"] >= 1 and whisper["calls"] >= 1, whisper
        assert whisper["failures"] <= failures_before  # this turn added none, and left nothing in flight
        assert whisper["in_flight"] <= in_flight_before and whisper["latency_ms"]["mean"] > 0
        mine = next(r for r in (await admin_get(admin_token, "/api/admin/sessions"))["sessions"]
                    if r["session_id"] == sid)
        said = mine["providers"][f"stt:{stt['provider']}"]
        assert said["state"] == "closed" and said["calls"] >= 1 and said["failures"] == 0, mine["providers"]
        assert said["in_flight"] == 0  # this session's utterance ended
        assert mine["providers"]["llm:local-dialogue"]["calls"] >= 1  # the spoken turn's reply
        warm = pools["warm_pool"]
        assert warm["target"] == 1 and 0 <= warm["ready"] <= 1 and warm["unclaimed_in_cluster"] >= 0
        assert 0 <= warm["node_idle_cpus"] <= os.cpu_count() and warm["refill_idle_cpus"] == server_config.server.refill_idle_cpus

        overview = await admin_get(admin_token, "/api/admin/overview")
        assert {"sessions", "pools", "breakers", "warm_pool", "errors", "series", "time"} <= set(overview)
        assert sid in {r["session_id"] for r in overview["sessions"]["sessions"]}


@pytest.fixture(scope="module")
def llm_fake():
    with FakeOpenAIServer(api_key=LLM_KEY) as llm:
        yield llm


def cloud_llm_config(config, llm: FakeOpenAIServer):
    """`config` with the LLM on the loopback OpenAI-compatible fake, the
    embedded engine as its fallback, and a breaker that opens after two
    failures in a row and stays open for the test."""
    from actors.config import LLMConfig, ResilienceConfig

    llm_cfg = LLMConfig.model_validate({**config.llm.model_dump(), "provider": "openai-compatible",
                                        "fallback": ["local-dialogue"],
                                        "openai_compat": {"base_url": llm.base_url, "api_key": LLM_KEY,
                                                          "model": "qwen-plus", "retries": 0}})
    return config.model_copy(update={"llm": llm_cfg, "resilience": ResilienceConfig(breaker_failures=2,
                                                                                      breaker_reset_s=600.0)})


async def provider_row(token: str, key: str) -> dict:
    rows = {f"{p['kind']}:{p['provider']}": p for p in (await admin_get(token, "/api/admin/pools"))["providers"]}
    assert key in rows, list(rows)
    return rows[key]


async def test_a_sessions_breaker_and_calls_on_a_cloud_provider_show_in_the_panel(
        server, server_config, admin_token, llm_fake, tap, browser):
    """The breakers that guard voice turns live in the session processes:
    the panel collects them. A slow call is seen in flight; a 429 storm opens
    the session's breaker and the panel says `open`, on the API and the page."""
    sid = new_session_id()
    actor = await open_session(cloud_llm_config(server_config, llm_fake), sid)
    key = "llm:openai-compatible"
    try:
        async with tap(actor) as t:
            llm_fake.default = Script.text("Slowly: eighty-four.", first_token_s=3.0)
            turn = await actor.send_text.remote(QUESTION)
            row = await wait_for_row(admin_token, key, lambda r: r["in_flight"] > 0)
            assert row["in_flight"] == 1 and row["role"] is None and row["state"] == "closed", row
            await t.wait_for(lambda e: e.type == "metrics" and e.turn_id == turn, 60)
            row = await provider_row(admin_token, key)
            assert row["in_flight"] == 0 and row["calls"] == 1 and row["failures"] == 0, row
            assert row["latency_ms"]["mean"] >= 3000 and row["latency_ms"]["n"] == 1, row  # the fake's delay

            llm_fake.default = Script.error(429, "Too many requests")
            for _ in range(2):
                turn = await actor.send_text.remote(QUESTION)
                await t.wait_for(lambda e: e.type == "metrics" and e.turn_id == turn, 60)
        row = await provider_row(admin_token, key)
        assert row["state"] == "open" and row["open_in"] == 1, row
        assert row["calls"] == 3 and row["failures"] == 2 and row["consecutive_failures"] == 2, row
        assert row["opened"] == 1 and "llm.rate_limited" in row["last_error"], row
        fallback = next(r for r in (await admin_get(admin_token, "/api/admin/sessions"))["sessions"]
                        if r["session_id"] == sid)["providers"]
        assert fallback[key]["state"] == "open", fallback
        dialogue = fallback["llm:local-dialogue"]  # answered both turns (a tool round and the answer each)
        assert dialogue["state"] == "closed" and dialogue["calls"] >= 2 and dialogue["failures"] == 0, dialogue

        page = await browser.new_page(viewport={"width": 1360, "height": 1200})
        try:
            await _sign_in(page, admin_token)
            cell = page.locator(f'#providers tr[data-provider="{key}"][data-state="open"] .breaker')
            await cell.wait_for(timeout=20_000)
            assert (await cell.inner_text()).startswith("open in 1 of ")
            assert await page.locator(f'#providers tr[data-provider="{key}"] .in-flight').inner_text() == "0"
        finally:
            await page.close()
    finally:
        with contextlib.suppress(ray.exceptions.RayActorError):
            await actor.close.remote()
        await wait_gone(server_config, sid)
    # the session is gone, and so is what it reported: the provider is in none of the server's
    # chains and no live session uses it now, so it has no row
    rows = {f"{p['kind']}:{p['provider']}" for p in (await admin_get(admin_token, "/api/admin/pools"))["providers"]}
    assert key not in rows and "llm:local-dialogue" in rows, rows


async def wait_for_row(token: str, key: str, ok, timeout_s: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        row = await provider_row(token, key)
        if ok(row):
            return row
        assert time.monotonic() < deadline, row
        await asyncio.sleep(0.2)


async def test_config_is_masked(server, admin_token, server_config):
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.get(f"{BASE}/api/admin/config", headers=bearer(admin_token))
    assert r.status_code == 200
    for name, value in PLANTED.items():
        assert value not in r.text, f"the {name} secret leaked into /api/admin/config"
    cfg = r.json()
    assert cfg["auth"]["jwt_secret"] == MASK and cfg["auth"]["device_secret"] == MASK
    assert cfg["auth"]["users"]["alice"]["password_hash"] == MASK
    assert cfg["auth"]["users"]["alice"]["roles"] == ["user", "admin"]
    assert cfg["llm"]["openai_compat"]["api_key"] == MASK and cfg["llm"]["openai_compat"]["model"] == "qwen-plus"
    assert cfg["llm"]["openai_compat"]["api_key_env"] == "DASHSCOPE_API_KEY"  # a variable's name, shown
    assert cfg["stt"]["dashscope"]["api_key"] == MASK and cfg["tts"]["dashscope"]["api_key"] == MASK
    assert "model" in cfg["stt"]["dashscope"]  # the vendor's defaults, filled in
    assert cfg["server"]["namespace"] == server_config.server.namespace
    assert cfg["auth"]["token_ttl_s"] == server_config.auth.token_ttl_s  # numbers are never masked
    assert cfg["limits"]["requests_per_minute"] == server_config.limits.requests_per_minute


def test_mask_config_covers_headers_env_and_urls(config):
    from actors.agent.tools import MCPServerConfig

    tools = config.tools.model_copy(update={"mcp_servers": [
        MCPServerConfig(name="gh", transport="stdio", command="gh-mcp", env={"GITHUB_PAT": "ghp_PLANTEDenv"}),
        MCPServerConfig(name="web", transport="http", url="https://u:PLANTEDurlpw@mcp.example.com/mcp",
                        headers={"X-Whatever": "PLANTEDheader"}),
    ]})
    memory = config.memory.model_copy(update={"url": "postgresql://va:PLANTEDdbpw@db:5432/va"})
    resilience = config.resilience.model_copy(update={"key_limits": {"DASHSCOPE_API_KEY": {"max_concurrency": 3}}})
    masked = mask_config(config.model_copy(update={"tools": tools, "memory": memory, "resilience": resilience}))
    text = json.dumps(masked)
    assert "PLANTED" not in text, text
    assert masked["memory"]["url"] == f"postgresql://{MASK}@db:5432/va"
    assert masked["tools"]["mcp_servers"][0]["env"] == {"GITHUB_PAT": MASK}
    assert masked["tools"]["mcp_servers"][0]["command"] == "gh-mcp"
    assert masked["resilience"]["key_limits"]["DASHSCOPE_API_KEY"]["max_concurrency"] == 3


# ------------------------------------------------------------------ the page, in a real browser
@pytest.fixture(scope="module")
async def browser(server):
    path = find_chromium()
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=path, headless=True,
                                    args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"])
        try:
            yield b
        finally:
            await b.close()


async def _sign_in(page, token: str) -> None:
    await page.goto(f"{BASE}/admin")
    await page.fill("#token", token)
    await page.click("#use-token")


async def test_panel_in_a_browser_shows_and_ends_a_session(browser, server_config, admin_token, user_token):
    async with await NativeClient.connect(f"{WS}/ws/voice", user_token) as client:
        sid = client.session_id
        await client.ask_text(QUESTION)
        page = await browser.new_page(viewport={"width": 1360, "height": 1500})
        problems: list[str] = []
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.on("dialog", lambda d: asyncio.ensure_future(d.accept()))  # the "end this session?" confirm
        try:
            await _sign_in(page, admin_token)
            row = page.locator(f'#sessions tr[data-session-id="{sid}"]')
            await row.wait_for(timeout=20_000)
            assert "user:bob" in await row.inner_text()
            assert await page.locator("#status").inner_text() != "not signed in"
            await page.locator("#pools tbody tr").first.wait_for(timeout=10_000)
            assert await page.locator("#plot-latency path").count() >= 1  # the turn's latency is drawn
            await page.locator("#plot-sessions path").first.wait_for(timeout=10_000)

            await row.locator("button.view").click()
            await page.locator("#transcript li").first.wait_for(timeout=10_000)
            assert "84" in await page.locator("#transcript").inner_text()
            # a few samples on the plots for the picture
            await wait_for_js(page, "() => document.querySelectorAll('#plot-sessions circle').length >= 6",
                              timeout_ms=30_000)
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            await page.screenshot(path=str(SCREENSHOT), full_page=True)

            await row.locator("button.end").click()
            await row.wait_for(state="detached", timeout=20_000)
            await wait_closed(client)
            await wait_gone(server_config, sid)

            # the server goes away: the page says so, and recovers when it is back
            await page.route("**/api/admin/**", lambda route: route.abort())
            await page.locator("#status.unreachable").wait_for(timeout=15_000)
            assert "unreachable" in (await page.locator("#message").inner_text()).lower()
            await page.unroute("**/api/admin/**")
            await page.locator("#status.live").wait_for(timeout=15_000)
            assert await page.locator("#message").is_hidden()
            assert not problems, problems
        finally:
            await page.close()
    assert SCREENSHOT.stat().st_size > 10_000


async def test_panel_in_a_browser_refuses_a_user_and_an_expired_token(browser, auth, user_token):
    page = await browser.new_page()
    try:
        await _sign_in(page, user_token)
        message = page.locator("#message")
        await message.wait_for(state="visible", timeout=15_000)
        assert "this needs the admin role" in await message.inner_text()
        assert await page.locator("#panel").is_hidden()
        assert await page.locator("#sessions tbody tr").count() == 0
        assert await page.evaluate("sessionStorage.length") == 0  # a reload does not try it again

        expired = auth.issue_token("root", roles=("user", "admin"), ttl_s=-120)
        await _sign_in(page, expired)
        await wait_for_js(page, "() => document.getElementById('message').textContent.includes('expired')",
                          timeout_ms=15_000)
        assert await page.locator("#panel").is_hidden()
        assert await page.evaluate("sessionStorage.length") == 0  # the refused token is not kept
    finally:
        await page.close()


async def test_panel_drops_a_slow_answer_for_a_previous_sign_in(browser, auth, admin_token):
    """A sign-in answered after the next one began must not undo it: the
    admin token's /api/auth/me is held back until the expired token has been
    refused, and the refusal stays on screen (the late answer used to sign the
    page in, or clear the message, depending on which came last)."""
    page = await browser.new_page()
    released = asyncio.Event()
    finished = asyncio.Event()

    async def hold_the_admin_sign_in(route) -> None:
        if route.request.headers.get("authorization") == f"Bearer {admin_token}":
            await released.wait()
        await route.continue_()

    def on_finished(request) -> None:
        if request.url.endswith("/api/auth/me") and request.headers.get("authorization") == f"Bearer {admin_token}":
            finished.set()

    page.on("requestfinished", on_finished)
    try:
        await page.route("**/api/auth/me", hold_the_admin_sign_in)
        await _sign_in(page, admin_token)
        expired = auth.issue_token("root", roles=("user", "admin"), ttl_s=-120)
        await page.fill("#token", expired)
        await page.click("#use-token")
        await wait_for_js(page, "() => document.getElementById('message').textContent.includes('expired')",
                          timeout_ms=15_000)
        released.set()
        await asyncio.wait_for(finished.wait(), 15)
        await page.evaluate("() => new Promise((r) => setTimeout(r, 300))")  # the late answer's handlers run
        assert "expired" in await page.locator("#message").inner_text()
        assert await page.locator("#panel").is_hidden()
        assert await page.locator("#login").is_visible()
        assert await page.evaluate("sessionStorage.length") == 0
    finally:
        await page.close()


async def test_panel_logs_in_with_a_password_shows_the_config_a_device_and_forgets_a_session(
        browser, server_config, user_token, store):
    """The panel's other paths: the user name / password form (a wrong
    password refused), the effective configuration with its secrets masked,
    a session a device owns, and the forget button."""
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.post(f"{BASE}/xiaozhi/ota/", headers={"Device-Id": DEVICE, "Client-Id": DEVICE}, json={})
    assert r.status_code == 200, r.text
    ws = r.json()["websocket"]
    page = await browser.new_page(viewport={"width": 1360, "height": 1500})
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.on("dialog", lambda d: asyncio.ensure_future(d.accept()))  # "end this session and delete ...?"
    try:
        async with await XiaozhiClient.connect(ws["url"], ws["token"], DEVICE, client_id=DEVICE) as device, \
                await NativeClient.connect(f"{WS}/ws/voice", user_token) as client:
            device_sid, sid = device.session_id, client.session_id
            await client.ask_text("Remember that my locker is number nine.")
            await page.goto(f"{BASE}/admin")
            await page.fill("#username", "alice")
            await page.fill("#password", "not her password")
            await page.click("#log-in")
            await wait_for_js(page, "() => document.getElementById('message').textContent.includes('Log in failed')",
                              timeout_ms=15_000)
            assert await page.locator("#panel").is_hidden()
            await page.fill("#password", "wonderland")
            await page.click("#log-in")
            await page.locator("#panel").wait_for(timeout=20_000)
            assert await page.locator("#who").inner_text() == "user:alice"
            assert await page.evaluate("sessionStorage.length") == 1  # the token this login got, for this tab

            device_row = page.locator(f'#sessions tr[data-session-id="{device_sid}"]')
            await device_row.wait_for(timeout=20_000)
            assert f"device:{DEVICE}" in await device_row.inner_text()

            await page.locator("#config-details summary").click()
            await wait_for_js(page, "() => document.getElementById('config').textContent.length > 100",
                              timeout_ms=15_000)
            shown = await page.locator("#config").inner_text()
            assert await page.locator("#config").is_visible()
            cfg = json.loads(shown)
            assert cfg["auth"]["jwt_secret"] == MASK and cfg["llm"]["openai_compat"]["api_key"] == MASK
            assert cfg["auth"]["device_allowlist"] == [DEVICE]  # not a secret: shown
            assert not [name for name, value in PLANTED.items() if value in shown]

            row = page.locator(f'#sessions tr[data-session-id="{sid}"]')
            await row.wait_for(timeout=20_000)
            assert await store.known(sid)
            await row.locator("button.forget").click()
            await row.wait_for(state="detached", timeout=20_000)
            await wait_closed(client)
        await wait_gone(server_config, sid)
        assert not await store.known(sid)
        assert not problems, problems
    finally:
        await page.close()
