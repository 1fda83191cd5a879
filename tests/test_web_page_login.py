"""The voice page's sign-in, its refusals and its files, in a real headless
Chromium (split from tests/test_web_page.py, whose fixtures and helpers it
uses): the static files and their headers, the development-token route, a
wrong password, the development token signing in, expired and invalid
tokens, a denied microphone and no microphone at all."""

from __future__ import annotations

import json

import httpx
from pydantic import SecretStr

from actors.ingress.auth import Authenticator
from tests import test_web_page as web
from tests.browser import TEST_FLAG, connect, events, text_of, type_question, wait_for_js, wait_turn_done
from tests.conftest import INGRESS_PORT
from tests.test_web_page import BASE, PASSWORD, QUESTION, USER, _args, sign_in

# test_web_page's fixtures, bound here so that pytest finds them for this module too (its own server)
# (chromium_path and page come from conftest.py)
web_config, server, auth, playwright_driver, question_wav, browser = (
    web.web_config, web.server, web.auth, web.playwright_driver, web.question_wav, web.browser)


# ------------------------------------------------------------------ the page and its files
async def test_static_files_and_headers(server):
    async with httpx.AsyncClient(timeout=10) as http:
        index = await http.get(f"{BASE}/")
        js = await http.get(f"{BASE}/web/voice.js")
        worklet = await http.get(f"{BASE}/web/capture-worklet.js")
        hook = await http.get(f"{BASE}/web/test-hook.js")
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
    assert hook.status_code == 200 and "createTestHook" in hook.text
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


async def test_no_microphone_says_so(playwright_driver, chromium_path, server):
    # a browser with no fake capture device: this machine has no microphone to give the page
    browser = await playwright_driver.chromium.launch(executable_path=chromium_path, headless=True,
                                                      args=["--use-fake-ui-for-media-stream", "--no-sandbox"])
    try:
        pg = await (await browser.new_context()).new_page()
        pg.set_default_timeout(30_000)
        await sign_in(pg)
        await pg.click('input[name="mode"][value="handsfree"]')
        await pg.wait_for_selector("#mic-message:not([hidden])")
        assert await pg.inner_text("#mic-message") == "No microphone was found. You can still type below."
        assert await pg.is_checked('input[name="mode"][value="off"]')
    finally:
        await browser.close()


async def test_wrong_password_says_so_and_no_test_hook_without_the_flag(page):
    await page.goto(BASE + "/")  # as a user opens it: the page keeps no recordings for tests
    await page.wait_for_selector("#login:not([hidden])")
    assert await page.evaluate("typeof window.voiceTest") == "undefined"
    await page.fill("#username", USER)
    await page.fill("#password", PASSWORD + "!")
    await page.click("#login-submit")
    await page.wait_for_selector("#login-message:not([hidden])")
    assert await page.inner_text("#login-message") == "Wrong user name or password."
    assert not await page.is_visible("#app")
    assert await page.evaluate("sessionStorage.getItem('va.token')") is None
    await sign_in(page)  # the right password then works
    assert await page.evaluate("typeof window.voiceTest") == "object"


async def test_development_token_signs_in_on_this_machine(page, auth, web_config, tmp_path):
    """The page's side of "use development token": run_ingress is not `voice-actors serve`, so
    the route (whose refusals test_dev_token_route_only_for_this_machine covers) is answered
    here with what it would hand out, made by its own code from a token `serve` would write."""
    from actors.cli import refresh_dev_token
    from serve_app import VoiceIngress

    ingress = VoiceIngress.func_or_class
    refresh_dev_token(web_config, tmp_path / "dev-token")
    token = ingress._dev_token_from(auth, tmp_path / "dev-token", ingress.DEV_SUBJECT)
    assert token

    async def hand_out(route) -> None:
        await route.fulfill(status=200, content_type="application/json",
                            body=json.dumps({"access_token": token, "token_type": "bearer", "expires_in": 600}))

    await page.route("**/api/auth/dev-token", hand_out)
    await page.goto(BASE + TEST_FLAG)
    await page.wait_for_selector("#dev-login:not([hidden])")  # shown on 127.0.0.1
    await page.click("#dev-token")
    await page.wait_for_selector("#app:not([hidden])")
    assert await page.inner_text("#whoami") == f"signed in as {ingress.DEV_SUBJECT}"
    assert await page.evaluate("sessionStorage.getItem('va.token')") == token
    await wait_for_js(page, "() => document.querySelector('#persona').options.length > 0")
    hello = await connect(page)  # the real server accepts it
    assert hello["session_id"]


async def test_expired_and_invalid_tokens_show_the_login(browser, auth):
    async def page_with(token: str, valid_for_http: str | None = None):
        context = await browser.new_context()
        await context.add_init_script(f"sessionStorage.setItem('va.token', {token!r})")
        if valid_for_http:  # the page's HTTP calls go out with this token instead
            async def swap(route) -> None:
                await route.continue_(headers={**route.request.headers, "authorization": f"Bearer {valid_for_http}"})

            await context.route("**/api/**", swap)
        pg = await context.new_page()
        pg.set_default_timeout(30_000)
        await pg.goto(BASE + TEST_FLAG)
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

    # a token that expired while the page was open: the page checked it (here: its HTTP calls
    # carry a valid one, so no clock race), the socket is refused (4401) and the login comes back
    context, pg = await page_with(auth.issue_token("web-tester", ttl_s=-60),
                                  valid_for_http=auth.issue_token("web-tester", ttl_s=600))
    await pg.wait_for_selector("#app:not([hidden])")
    await wait_for_js(pg, "() => document.querySelector('#persona').options.length > 0")
    await pg.click("#connect")
    await pg.wait_for_selector("#login-message:not([hidden])")
    assert "expired" in (await pg.inner_text("#login-message")).lower()
    assert not await pg.is_visible("#app")
    await context.close()
