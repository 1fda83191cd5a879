"""The browser voice page (web/, served at /) in a real headless Chromium
driven by Playwright: Chromium's fake microphone plays a question synthesised
by the embedded voice, the page streams it over /ws/voice, and the test checks
what the page heard, showed, received and actually played.

Needs the `playwright` Python package (the `test` extra) and a Chromium
(`sh tests/system-deps.sh` installs Debian's). Without them these tests fail,
naming what is missing, unless VA_ALLOW_NO_BROWSER=1 (then they skip)."""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from pydantic import SecretStr

from actors.audio import silence, write_wav
from actors.config import UserConfig
from actors.ingress.auth import Authenticator, hash_password
from tests.browser import find_chromium, wait_for_js
from tests.conftest import INGRESS_PORT, run_ingress

BASE = f"http://127.0.0.1:{INGRESS_PORT}"
USER, PASSWORD = "web-tester", "correct horse battery"
QUESTION = "What is twelve times seven?"
LONG_QUESTION = "Tell me about the Mona Lisa."
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "voice-page.png"


@pytest.fixture(scope="module")
def chromium_path() -> str:
    return find_chromium()


@pytest.fixture(scope="module")
def web_config(config):
    auth = config.auth.model_copy(update={
        "jwt_secret": SecretStr("web-test-jwt-secret-0123456789abcdef"),
        "device_secret": SecretStr("web-test-device-secret-0123456789ab"),
        "users": {USER: UserConfig(password_hash=hash_password(PASSWORD, iterations=1000))},
    })
    limits = config.limits.model_copy(update={"requests_per_minute": 600, "burst": 60,
                                              "max_live_sessions_per_principal": 64})
    return config.model_copy(update={"auth": auth, "limits": limits})


@pytest.fixture(scope="module")
def server(ray_cluster, web_config):
    yield from run_ingress(web_config, "voice-actors-web-test")


@pytest.fixture(scope="module")
def auth(web_config) -> Authenticator:
    return Authenticator(web_config.auth)


@pytest.fixture(scope="module")
def question_wav(speech, tmp_path_factory) -> Path:
    """The fake microphone's file: Chromium loops it, so the silence after the
    question is long enough for the server's VAD to end the utterance and for
    the reply to play before the question comes round again."""
    path = tmp_path_factory.mktemp("mic") / "question.wav"
    write_wav(path, silence(500) + speech(QUESTION) + silence(9000), 16000)
    return path


@pytest.fixture(scope="module")
async def playwright_driver(chromium_path):
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        yield p


def _args(wav: Path, fake_ui: bool = True) -> list[str]:
    args = ["--use-fake-device-for-media-stream", f"--use-file-for-fake-audio-capture={wav}",
            "--autoplay-policy=no-user-gesture-required", "--no-sandbox"]
    return (["--use-fake-ui-for-media-stream"] if fake_ui else []) + args


@pytest.fixture(scope="module")
async def browser(playwright_driver, chromium_path, question_wav, server):
    b = await playwright_driver.chromium.launch(executable_path=chromium_path, headless=True,
                                                args=_args(question_wav))
    yield b
    await b.close()


@pytest.fixture
async def page(browser):
    context = await browser.new_context(viewport={"width": 900, "height": 860})
    pg = await context.new_page()
    pg.set_default_timeout(30_000)
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    await context.close()
    assert not errors, f"page errors: {errors}"


# ------------------------------------------------------------------ helpers
async def sign_in(pg, base: str = BASE) -> None:
    await pg.goto(base + "/")
    await pg.wait_for_selector("#login:not([hidden])")
    await pg.fill("#username", USER)
    await pg.fill("#password", PASSWORD)
    await pg.click("#login-submit")
    await pg.wait_for_selector("#app:not([hidden])")
    await wait_for_js(pg, "() => document.querySelector('#persona').options.length > 0")


async def connect(pg) -> dict:
    await pg.click("#connect")
    await wait_for_js(pg, "() => window.voiceTest.state.connected")
    return await pg.evaluate("window.voiceTest.hellos.at(-1)")


async def events(pg) -> list[dict]:
    return await pg.evaluate("window.voiceTest.events")


async def wait_turn_done(pg, after: int = 0, spoken: bool = False, timeout_ms: int = 90_000) -> int:
    """Wait for a turn's `metrics` (a spoken one: after its `stt.final`) among
    the events from index `after`; → its turn id."""
    return await _json_value(pg, """([after, spoken]) => {
        const evs = window.voiceTest.events.slice(after);
        const m = evs.find(e => e.type === 'metrics' && (!spoken ||
            evs.some(f => f.type === 'stt.final' && f.turn_id === e.turn_id)));
        return m ? m.turn_id : null;
    }""", [after, spoken], timeout_ms)


async def _json_value(pg, fn: str, arg, timeout_ms: int):
    return await wait_for_js(pg, fn, arg, timeout_ms=timeout_ms)


async def turn_pcm(pg, turn_id: int) -> np.ndarray:
    return np.asarray(await pg.evaluate("t => Array.from(window.voiceTest.turnPcm(t))", turn_id), dtype=np.float64)


def dbfs(samples: np.ndarray) -> float:
    rms = float(np.sqrt(np.mean(np.square(samples / 32768.0)))) if len(samples) else 0.0
    return 20 * np.log10(max(rms, 1e-9))


def text_of(evs: list[dict], type_: str, turn_id: int) -> str:
    return "".join(e.get("text", "") for e in evs if e["type"] == type_ and e.get("turn_id") == turn_id)


async def type_question(pg, text: str) -> int:
    before = len(await events(pg))
    await pg.fill("#text-input", text)
    await pg.press("#text-input", "Enter")
    return before


async def wait_playing(pg, seconds: float, timeout_ms: int = 60_000) -> None:
    """Until the page has played `seconds` of the reply and more is still scheduled."""
    await wait_for_js(pg, "s => window.voiceTest.playedSamples > s * window.voiceTest.state.outputRate"
                      " && window.voiceTest.activeSources > 0", seconds, timeout_ms=timeout_ms, poll_ms=50)


# ------------------------------------------------------------------ the page and its files
async def test_static_files_and_headers(server):
    async with httpx.AsyncClient(timeout=10) as http:
        index = await http.get(f"{BASE}/")
        js = await http.get(f"{BASE}/web/voice.js")
        worklet = await http.get(f"{BASE}/web/capture-worklet.js")
        css = await http.get(f"{BASE}/web/voice.css")
        refused = [await http.get(f"{BASE}{p}") for p in (
            "/web/..%2fserve_app.py", "/web/%2e%2e%2fpyproject.toml", "/web/nope.js", "/web/.hidden.js",
            "/web/voice.py", "/web/index.html%00.js")]
    assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
    assert '<script type="module" src="/web/voice.js">' in index.text
    csp = index.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert f"connect-src 'self' ws://127.0.0.1:{INGRESS_PORT} wss://127.0.0.1:{INGRESS_PORT};" in csp
    assert index.headers["x-content-type-options"] == "nosniff"
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert worklet.status_code == 200 and "registerProcessor" in worklet.text
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    assert [r.status_code for r in refused] == [404] * len(refused), [(r.url, r.status_code) for r in refused]


async def test_dev_token_route_only_for_this_machine(server, auth, web_config, tmp_path):
    from actors.cli import refresh_dev_token
    from serve_app import VoiceIngress

    ingress = VoiceIngress.func_or_class
    refusal = ingress._dev_token_refusal
    local = {"host": f"127.0.0.1:{INGRESS_PORT}"}
    assert refusal("127.0.0.1", local) is None
    assert refusal("::1", {"host": f"localhost:{INGRESS_PORT}"}) is None
    assert refusal("::ffff:127.0.0.1", {**local, "origin": f"http://127.0.0.1:{INGRESS_PORT}"}) is None
    assert refusal("192.168.1.20", local)  # not this machine
    assert refusal("unknown", local)
    assert refusal("127.0.0.1", {**local, "x-forwarded-for": "127.0.0.1"})  # a proxy claiming loopback
    assert refusal("127.0.0.1", {**local, "X-Real-IP": "127.0.0.1"})
    assert refusal("127.0.0.1", {**local, "forwarded": "for=127.0.0.1"})
    assert refusal("127.0.0.1", {"host": "evil.example:8000"})  # DNS rebinding
    assert refusal("127.0.0.1", {**local, "origin": "http://evil.example"})  # another site's page
    assert refusal("127.0.0.1", {**local, "origin": "null"})
    assert refusal("127.0.0.1", {**local, "sec-fetch-site": "cross-site"})
    assert refusal("127.0.0.1", {**local, "sec-fetch-site": "same-site"})

    # the token: only from a development token this server signed, and never with its admin role
    path = tmp_path / "dev-token"
    assert ingress._dev_token_from(auth, path, "local-dev") is None  # `serve` did not make one
    refresh_dev_token(web_config, path)  # what `voice-actors serve` writes
    token = ingress._dev_token_from(auth, path, "local-dev")
    assert token and auth.verify_token(token).subject == "local-dev" and auth.verify_token(token).roles == ("user",)
    other_secret = SecretStr("another-server-secret-0123456789abcdef")
    other = Authenticator(web_config.auth.model_copy(update={"jwt_secret": other_secret}))
    path.write_text(other.issue_token("local-dev", roles=("admin",)))
    assert ingress._dev_token_from(auth, path, "local-dev") is None

    # over HTTP from this machine: refused with a proxy header, a foreign Host or Origin; else the
    # server says it has no development token (run_ingress is not `voice-actors serve`)
    async with httpx.AsyncClient(timeout=10) as http:
        url = f"{BASE}/api/auth/dev-token"
        for headers in ({"X-Forwarded-For": "127.0.0.1"}, {"Host": "evil.example"},
                        {"Origin": "http://evil.example"}, {"Sec-Fetch-Site": "cross-site"}):
            r = await http.get(url, headers=headers)
            assert r.status_code == 403 and r.json()["error"]["code"] == "auth.dev_token_forbidden", (headers, r.text)
        r = await http.get(url)
    assert r.status_code == 404 and r.json()["error"]["code"] == "auth.no_dev_token", r.text


# ------------------------------------------------------------------ talking
async def test_spoken_turn_transcript_reply_and_audible_audio(page):
    await sign_in(page)
    hello = await connect(page)
    assert hello["audio_in"]["sample_rate"] == 16000 and hello["audio_out"] == {
        "format": "pcm16", "sample_rate": 24000, "channels": 1}
    t0 = time.monotonic()
    await page.check('input[name="mode"][value="handsfree"]')
    heard = await _json_value(page, "() => (window.voiceTest.events.find(e => e.type === 'stt.final') || {}).turn_id",
                              None, 90_000)
    await page.check('input[name="mode"][value="off"]')  # the fake microphone loops the question
    turn = await wait_turn_done(page, spoken=True)
    assert turn == heard
    evs = await events(page)
    final = text_of(evs, "stt.final", turn)
    reply = text_of(evs, "llm.delta", turn)
    assert "12" in final and "7" in final, final
    assert "84" in reply, reply
    assert any(e["type"] == "vad.speech_start" for e in evs)
    assert any(e["type"] == "tts.start" and e.get("turn_id") == turn and e["sample_rate"] == 24000 for e in evs), [
        (e["type"], e.get("turn_id"), e.get("sample_rate")) for e in evs]
    metrics = next(e for e in evs if e["type"] == "metrics" and e["turn_id"] == turn)
    assert metrics["first_audio_ms"] > 0 and not metrics["interrupted"]
    # the page shows it: the transcript, the reply text as streamed, the turn's first-audio time
    block = page.locator(f'.turn[data-turn="{turn}"]')
    assert "12" in await block.locator(".user").inner_text()
    assert (await block.locator(".reply").inner_text()).strip() == reply.strip()
    shown = math.floor(metrics["first_audio_ms"] + 0.5)  # JavaScript's Math.round, not Python's half-to-even
    assert f"first audio {shown} ms" in await block.locator(".meta").inner_text()
    # the audio it received is the spoken reply: loud enough, as long as a short sentence takes
    pcm = await turn_pcm(page, turn)
    seconds = len(pcm) / 24000
    assert 0.8 < seconds < 10, seconds
    assert dbfs(pcm) > -35, dbfs(pcm)
    # ... and it was played out on the AudioContext's clock, not just stored
    await wait_for_js(page, "n => window.voiceTest.playedSamples >= n", int(len(pcm) * 0.95), timeout_ms=20_000)
    assert await page.evaluate("window.voiceTest.activeSources") == 0
    assert await page.evaluate("window.voiceTest.sentFrames") > 20
    print(f"spoken turn in {time.monotonic() - t0:.1f} s; first audio {metrics['first_audio_ms']:.0f} ms")


async def test_typed_questions_in_english_and_chinese(page):
    await sign_in(page)
    await connect(page)
    before = await type_question(page, QUESTION)
    assert await page.locator(".turn .user.typed").last.inner_text() == QUESTION
    turn = await wait_turn_done(page, after=before)
    evs = await events(page)
    assert "84" in text_of(evs, "llm.delta", turn)
    assert not any(e["type"] == "stt.final" for e in evs[before:])
    pcm = await turn_pcm(page, turn)
    assert len(pcm) / 24000 > 0.8 and dbfs(pcm) > -35

    # a Chinese persona: the session goes on (same id) and the reply is shown as Chinese text
    sid = await page.evaluate("window.voiceTest.state.sessionId")
    hellos = await page.evaluate("window.voiceTest.hellos.length")
    await page.select_option("#persona", "museum-guide-zh")
    await wait_for_js(page, "n => window.voiceTest.hellos.length > n && window.voiceTest.state.connected", hellos)
    assert await page.evaluate("window.voiceTest.hellos.at(-1).session_id") == sid
    before = await type_question(page, "你好，小智！")  # the offline engine answers in English ...
    await wait_turn_done(page, after=before)
    assert await page.locator(".turn .user.typed").last.inner_text() == "你好，小智！"
    before = await type_question(page, "Hello")  # ... and greets with the persona's Chinese name
    turn = await wait_turn_done(page, after=before)
    reply = text_of(await events(page), "llm.delta", turn)
    assert "小智" in reply, reply
    shown = page.locator(f'.turn[data-turn="{turn}"] .reply')
    assert (await shown.inner_text()).strip() == reply.strip()
    assert await shown.get_attribute("lang") == "zh"
    SCREENSHOT.parent.mkdir(exist_ok=True)
    await page.screenshot(path=str(SCREENSHOT), full_page=True)


async def test_interrupt_button_stops_playback_at_once(page):
    await sign_in(page)
    await connect(page)
    before = await type_question(page, LONG_QUESTION)
    await wait_playing(page, 0.6)
    turn = await page.evaluate("window.voiceTest.receivedTurns.at(-1)")
    await page.click("#interrupt")
    stopped = await page.evaluate("""() => ({active: window.voiceTest.activeSources,
                                             played: window.voiceTest.playedSamples,
                                             stop: window.voiceTest.stops.at(-1)})""")
    assert stopped["active"] == 0 and stopped["stop"]["reason"] == "interrupt" and stopped["stop"]["stopped"] > 0
    sent = await page.evaluate("window.voiceTest.sent")
    assert {"type": "interrupt"} in sent
    await wait_for_js(page, """([after, turn]) => window.voiceTest.events.slice(after).some(
            e => e.type === 'tts.stop' && e.turn_id === turn && e.reason === 'interrupted')""",
                      [before, turn], timeout_ms=10_000)
    await asyncio.sleep(1.0)
    assert await page.evaluate("window.voiceTest.playedSamples") == stopped["played"]  # nothing more played
    assert await page.evaluate("window.voiceTest.activeSources") == 0
    received = len(await turn_pcm(page, turn))
    assert stopped["played"] < received or received < 24000 * 30  # it was cut, not played out
    assert await page.locator(f'.turn[data-turn="{turn}"].interrupted').count() == 1


async def test_speech_barges_in_on_the_reply(page):
    await sign_in(page)
    await connect(page)
    before = await type_question(page, LONG_QUESTION)
    await wait_playing(page, 0.5)
    reply_turn = await page.evaluate("window.voiceTest.receivedTurns.at(-1)")
    await page.check('input[name="mode"][value="handsfree"]')  # the fake microphone speaks the question
    stop = await _json_value(page, """([after, turn]) => {
        const evs = window.voiceTest.events.slice(after);
        const cut = evs.find(e => e.type === 'tts.stop' && e.turn_id === turn && e.reason === 'interrupted');
        const st = window.voiceTest.stops.find(s => s.turn === turn && s.stopped > 0);
        return cut && st ? {cut, st} : null;
    }""", [before, reply_turn], 60_000)
    evs = await events(page)
    start = next(e for e in evs[before:] if e["type"] == "vad.speech_start")
    assert stop["cut"]["stream_ms"] == start["stream_ms"]
    assert stop["st"]["reason"] in ("speech", "tts.stop")
    # the spoken question is then answered as a turn of its own
    turn = await wait_turn_done(page, after=before, spoken=True)
    await page.check('input[name="mode"][value="off"]')
    assert turn != reply_turn and "84" in text_of(await events(page), "llm.delta", turn)
    metrics = [e for e in await events(page) if e["type"] == "metrics" and e["turn_id"] == reply_turn]
    assert metrics and metrics[0]["interrupted"]


async def test_press_to_talk_sends_manual_listen(page):
    await sign_in(page)
    await connect(page)
    await page.check('input[name="mode"][value="ptt"]')
    await page.wait_for_selector("#ptt:not([hidden])")
    frames = await page.evaluate("window.voiceTest.sentFrames")
    await asyncio.sleep(0.5)
    assert await page.evaluate("window.voiceTest.sentFrames") == frames  # nothing sent until pressed
    box = await page.locator("#ptt").bounding_box()
    await page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    await page.mouse.down()
    await asyncio.sleep(1.2)
    await page.mouse.up()
    held = await page.evaluate("window.voiceTest.sentFrames") - frames
    assert held >= 12, held  # ~1.2 s of 60 ms frames
    await asyncio.sleep(0.5)
    assert await page.evaluate("window.voiceTest.sentFrames") - frames == held
    sent = await page.evaluate("window.voiceTest.sent")
    assert {"type": "listen", "state": "start", "mode": "manual"} in sent
    assert {"type": "listen", "state": "stop", "mode": "manual"} in sent
    await page.check('input[name="mode"][value="off"]')


async def test_dropped_socket_reconnects_and_resumes(page):
    await sign_in(page)
    hello = await connect(page)
    await page.evaluate("window.voiceTest.dropSocket()")
    await wait_for_js(page, "() => window.voiceTest.hellos.length > 1", timeout_ms=20_000)
    again = await page.evaluate("window.voiceTest.hellos.at(-1)")
    assert again["session_id"] == hello["session_id"] and again["resumed"] is True
    assert "resumed" in await page.inner_text("#notice")
    assert "connected" in await page.inner_text("#conn-status")
    before = await type_question(page, QUESTION)
    turn = await wait_turn_done(page, after=before)
    assert "84" in text_of(await events(page), "llm.delta", turn)


# ------------------------------------------------------------------ refusals
async def test_denied_microphone_says_so_and_typing_still_works(playwright_driver, chromium_path, question_wav,
                                                               server):
    browser = await playwright_driver.chromium.launch(executable_path=chromium_path, headless=True,
                                                      args=_args(question_wav, fake_ui=False))
    try:
        context = await browser.new_context(permissions=[])
        pg = await context.new_page()
        pg.set_default_timeout(30_000)
        await sign_in(pg)
        await connect(pg)
        await pg.click('input[name="mode"][value="handsfree"]')
        await pg.wait_for_selector("#mic-message:not([hidden])")
        assert "denied" in (await pg.inner_text("#mic-message")).lower()
        assert await pg.is_checked('input[name="mode"][value="off"]')
        before = await type_question(pg, QUESTION)
        turn = await wait_turn_done(pg, after=before)
        assert "84" in text_of(await events(pg), "llm.delta", turn)
    finally:
        await browser.close()


async def test_expired_and_invalid_tokens_show_the_login(browser, auth):
    async def page_with(token: str):
        context = await browser.new_context()
        await context.add_init_script(f"sessionStorage.setItem('va.token', {token!r})")
        pg = await context.new_page()
        pg.set_default_timeout(30_000)
        await pg.goto(BASE + "/")
        return context, pg

    context, pg = await page_with(auth.issue_token("web-tester", ttl_s=-60))
    await pg.wait_for_selector("#login-message:not([hidden])")
    assert "expired" in (await pg.inner_text("#login-message")).lower()
    assert await pg.is_visible("#login-form") and not await pg.is_visible("#app")
    assert await pg.evaluate("sessionStorage.getItem('va.token')") is None
    # on 127.0.0.1 the page offers the development token; this server has none and says so
    assert await pg.is_visible("#dev-token")
    await pg.click("#dev-token")
    await wait_for_js(pg, "() => document.querySelector('#login-message').textContent.includes('not started')")
    await context.close()

    context, pg = await page_with("not-a-token")
    await pg.wait_for_selector("#login-message:not([hidden])")
    assert "no longer valid" in await pg.inner_text("#login-message")
    await context.close()

    # a token that expires while the page is open: the socket is refused (4401) and the login comes back
    context, pg = await page_with(auth.issue_token("web-tester", ttl_s=3))
    await pg.wait_for_selector("#app:not([hidden])")
    await asyncio.sleep(3.5)
    await pg.click("#connect")
    await pg.wait_for_selector("#login-message:not([hidden])")
    assert "expired" in (await pg.inner_text("#login-message")).lower()
    await context.close()
