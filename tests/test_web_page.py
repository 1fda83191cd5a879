"""The browser voice page (web/, served at /) in a real headless Chromium
driven by Playwright: Chromium's fake microphone plays a question synthesised
by the embedded voice, the page streams it over /ws/voice, and the test checks
what the page heard, showed (partial and final transcripts, the reply),
received (transcribed back by the embedded STT) and actually played (without
gaps); press to talk, interrupting, barge-in and a network drop. Sign-in,
refusals and the page's files: tests/test_web_page_login.py.

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

from actors.audio import resample_pcm16, silence, write_wav
from actors.config import UserConfig
from actors.ingress.auth import Authenticator, hash_password
from actors.pools import get_pool
from tests.browser import (
    TEST_FLAG,
    TcpRelay,
    connect,
    dbfs,
    events,
    text_of,
    turn_pcm,
    type_question,
    wait_for_js,
    wait_playing,
    wait_turn_done,
)
from tests.conftest import INGRESS_PORT, run_ingress

__all__ = ["connect", "dbfs", "events", "sign_in", "text_of", "turn_pcm", "type_question", "wait_playing",
           "wait_turn_done"]  # the page helpers, for other browser test modules

BASE = f"http://127.0.0.1:{INGRESS_PORT}"
USER, PASSWORD = "web-tester", "correct horse battery"
QUESTION = "What is twelve times seven?"
SPOKEN_QUESTION = "Could you please work out for me what twelve times seven is?"
"""What the fake microphone says: long enough (~3 s) for the server's Whisper,
re-decoding every 400 ms, to send partial transcripts before the end even on
a busy machine."""
LONG_QUESTION = "Tell me about the Mona Lisa."
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "voice-page.png"


def page_user_and_limits(config, tag: str):
    """The auth section with the browser tests' user (and secrets of `tag`'s
    own), and limits a page's many short sessions stay inside."""
    auth = config.auth.model_copy(update={
        "jwt_secret": SecretStr(f"{tag}-jwt-secret-0123456789abcdef"),
        "device_secret": SecretStr(f"{tag}-device-secret-0123456789ab"),
        "users": {USER: UserConfig(password_hash=hash_password(PASSWORD, iterations=1000))},
    })
    limits = config.limits.model_copy(update={"requests_per_minute": 600, "burst": 60,
                                              "max_live_sessions_per_principal": 64})
    return auth, limits


@pytest.fixture(scope="module")
def web_config(config):
    auth, limits = page_user_and_limits(config, "web-test")
    # partial transcripts while the user speaks, so the page's `stt.partial` view is exercised: a
    # re-decode every 400 ms, none cancelled by the word gaps of the question (decode_at_pause),
    # and 1.5 s of silence before the end of speech, so that on a busy machine, where one decode
    # of the growing question takes seconds, one still lands before the final transcript
    stt = config.stt.model_copy(update={"partial_interval_ms": 400, "decode_at_pause": False})
    vad = config.vad.model_copy(update={"end_silence_ms": 1500})
    return config.model_copy(update={"auth": auth, "limits": limits, "stt": stt, "vad": vad})


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
    write_wav(path, silence(500) + speech(SPOKEN_QUESTION) + silence(9000), 16000)
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


# ------------------------------------------------------------------ helpers (more in tests/browser.py)
async def sign_in(pg, base: str = BASE) -> None:
    """Open the page with its test hook (?test=1) and sign in through the form."""
    await pg.goto(base + TEST_FLAG)
    await pg.wait_for_selector("#login:not([hidden])")
    await pg.fill("#username", USER)
    await pg.fill("#password", PASSWORD)
    await pg.click("#login-submit")
    await pg.wait_for_selector("#app:not([hidden])")
    await wait_for_js(pg, "() => document.querySelector('#persona').options.length > 0")


async def _json_value(pg, fn: str, arg, timeout_ms: int):
    return await wait_for_js(pg, fn, arg, timeout_ms=timeout_ms)


WATCH_PARTIALS = """() => {
    // what the log showed as a partial transcript, in order (a MutationObserver runs between the
    // socket's messages, so no partial can come and go unseen)
    window.partialsSeen = [];
    const log = document.querySelector('#log');
    new MutationObserver(() => {
        for (const el of log.querySelectorAll('.turn .user.partial')) {
            const seen = {turn: Number(el.closest('.turn').dataset.turn), text: el.textContent};
            const last = window.partialsSeen.at(-1);
            if (!last || last.turn !== seen.turn || last.text !== seen.text) window.partialsSeen.push(seen);
        }
    }).observe(log, {subtree: true, childList: true, characterData: true, attributes: true});
}"""


async def heard_in(pcm: np.ndarray, config) -> str:
    """What the embedded STT (the server's Whisper pool) hears in 24 kHz reply audio."""
    pcm16 = resample_pcm16(pcm.astype(np.int16).tobytes(), 24000, 16000)
    return await get_pool("stt", "local-whisper", config).transcribe.remote(pcm16)


def asks_twelve_times_seven(transcript: str) -> bool:
    """Whisper writes the question's numbers as digits or as words, run to run."""
    said = transcript.lower()
    return ("12" in said or "twelve" in said) and ("7" in said or "seven" in said)


async def gaps_in(pg, turn: int) -> list[dict]:
    """Underruns of a turn's playback: chunks that came after the audio before them had run out."""
    return [g for g in await pg.evaluate("window.voiceTest.gaps") if g["turn"] == turn]


# ------------------------------------------------------------------ talking
async def test_spoken_turn_transcript_reply_and_audible_audio(page, web_config):
    await sign_in(page)
    hello = await connect(page)
    assert hello["audio_in"]["sample_rate"] == 16000 and hello["audio_out"] == {
        "format": "pcm16", "sample_rate": 24000, "channels": 1}
    await page.evaluate(WATCH_PARTIALS)
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
    assert asks_twelve_times_seven(final), final
    assert "84" in reply, reply
    assert any(e["type"] == "vad.speech_start" for e in evs)
    # partial transcripts came while the question was spoken, and the page showed each as one
    partials = [e for e in evs if e["type"] == "stt.partial" and e["turn_id"] == turn]
    assert partials, [(e["type"], e.get("turn_id")) for e in evs]
    assert evs.index(partials[0]) < next(i for i, e in enumerate(evs) if e["type"] == "stt.final")
    seen = [s["text"] for s in await page.evaluate("window.partialsSeen") if s["turn"] == turn]
    assert seen == [p["text"] for p in partials], (seen, partials)
    assert any(e["type"] == "tts.start" and e.get("turn_id") == turn and e["sample_rate"] == 24000 for e in evs), [
        (e["type"], e.get("turn_id"), e.get("sample_rate")) for e in evs]
    metrics = next(e for e in evs if e["type"] == "metrics" and e["turn_id"] == turn)
    assert metrics["first_audio_ms"] > 0 and not metrics["interrupted"]
    # the page shows it: the transcript, the reply text as streamed, the turn's first-audio time
    block = page.locator(f'.turn[data-turn="{turn}"]')
    assert asks_twelve_times_seven(await block.locator(".user").inner_text())
    assert await block.locator(".user.partial").count() == 0  # the final replaced the partial
    assert (await block.locator(".reply").inner_text()).strip() == reply.strip()
    shown = math.floor(metrics["first_audio_ms"] + 0.5)  # JavaScript's Math.round, not Python's half-to-even
    assert f"first audio {shown} ms" in await block.locator(".meta").inner_text()
    # the audio it received is the spoken reply: loud enough, as long as a short sentence takes,
    # and the embedded STT hears the answer in it
    pcm = await turn_pcm(page, turn)
    seconds = len(pcm) / 24000
    assert 0.8 < seconds < 10, seconds
    assert dbfs(pcm) > -35, dbfs(pcm)
    heard = await heard_in(pcm, web_config)
    assert "84" in heard or "eighty" in heard.lower(), heard
    # ... and it was played out on the AudioContext's clock, not just stored, without a gap
    await wait_for_js(page, "n => window.voiceTest.playedSamples >= n", int(len(pcm) * 0.95), timeout_ms=20_000)
    assert await page.evaluate("window.voiceTest.activeSources") == 0
    assert await gaps_in(page, turn) == []
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
    await wait_for_js(page, "n => window.voiceTest.playedSamples >= n", int(len(pcm) * 0.95), timeout_ms=20_000)
    assert await gaps_in(page, turn) == []

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
    assert stopped["played"] < received, (stopped, received)  # it was cut, not played out
    assert await page.locator(f'.turn[data-turn="{turn}"].interrupted').count() == 1


async def test_speech_barges_in_on_the_reply(page):
    await sign_in(page)
    await connect(page)
    before = await type_question(page, LONG_QUESTION)
    await wait_playing(page, 0.5)
    reply_turn = await page.evaluate("window.voiceTest.receivedTurns.at(-1)")
    # the fake microphone loops the question and 9 s of silence, at any phase: start listening in
    # the silence, so the first utterance heard is the whole question (a CI run once started
    # mid-question and heard only its end). Push to talk runs the microphone without sending.
    await page.check('input[name="mode"][value="ptt"]')
    await wait_for_js(page, "q => window.voiceTest.micPeaks.length >= 15 && "
                      "window.voiceTest.micPeaks.slice(-15).every(p => p < q)", QUIET, poll_ms=20)
    await page.check('input[name="mode"][value="handsfree"]')
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


QUIET, LOUD = 1000, 4000
"""Microphone frame peaks (of 32767) below which the fake microphone is in its
silence, and above which it is speaking the question."""


async def test_press_to_talk_question_is_answered(page):
    await sign_in(page)
    await connect(page)
    await page.check('input[name="mode"][value="ptt"]')
    await page.wait_for_selector("#ptt:not([hidden])")
    # press in the 9 s of silence of the looping question (the loop is at any phase) ...
    await wait_for_js(page, "q => window.voiceTest.micPeaks.length >= 15 && "
                      "window.voiceTest.micPeaks.slice(-15).every(p => p < q)", QUIET, poll_ms=20)
    frames = await page.evaluate("window.voiceTest.sentFrames")
    before = len(await events(page))
    mic_at = await page.evaluate("window.voiceTest.micFrames")
    assert frames == 0  # nothing sent until pressed
    box = await page.locator("#ptt").bounding_box()
    await page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    await page.mouse.down()
    # ... hold it across the question, and let go 0.9 s after it ends (its word gaps are shorter)
    peaks = await wait_for_js(page, """([from, loud, quiet]) => {
        const t = window.voiceTest, n = Math.min(t.micFrames - from, t.micPeaks.length);
        if (n <= 15) return null;  // (and slice(-0) would be every peak ever kept, not none)
        const p = t.micPeaks.slice(-n);
        return p.some(x => x >= loud) && p.slice(-15).every(x => x < quiet) ? p : null;
    }""", [mic_at, LOUD, QUIET], poll_ms=20)
    await page.mouse.up()
    held = await page.evaluate("window.voiceTest.sentFrames") - frames
    assert held >= len(peaks) - 2, (held, len(peaks))  # every frame while held went out
    turn = await wait_turn_done(page, after=before, spoken=True)
    evs = await events(page)
    final = text_of(evs, "stt.final", turn)
    assert asks_twelve_times_seven(final), final
    assert "84" in text_of(evs, "llm.delta", turn)
    assert await page.evaluate("window.voiceTest.sentFrames") - frames == held  # nothing after letting go
    sent = await page.evaluate("window.voiceTest.sent")
    assert {"type": "listen", "state": "start", "mode": "manual"} in sent
    assert {"type": "listen", "state": "stop", "mode": "manual"} in sent
    await page.check('input[name="mode"][value="off"]')


async def test_network_drop_reconnects_and_resumes_the_conversation(page, auth):
    async with TcpRelay(INGRESS_PORT) as relay:  # the page reaches the server through a cable we can cut
        await sign_in(page, relay.base)
        hello = await connect(page)
        before = await type_question(page, QUESTION)
        first = await wait_turn_done(page, after=before)
        relay.down = True
        assert relay.cut() >= 1  # TCP reset: no close handshake (1006), as when a network goes away
        await wait_for_js(page, "() => !window.voiceTest.state.connected")
        assert "connection lost" in await page.inner_text("#conn-status")
        await asyncio.sleep(1.0)  # a reconnect attempt or two fail while the network is down
        relay.down = False
        await wait_for_js(page, "() => window.voiceTest.hellos.length > 1", timeout_ms=30_000)
        again = await page.evaluate("window.voiceTest.hellos.at(-1)")
        assert again["session_id"] == hello["session_id"] and again["resumed"] is True
        assert "resumed" in await page.inner_text("#notice")
        assert "connected" in await page.inner_text("#conn-status")
        before = await type_question(page, "Hello")
        turn = await wait_turn_done(page, after=before)
        assert turn > first  # the same conversation went on
    # the earlier turn is still on the page and in the session's history on the server
    assert await page.locator(f'.turn[data-turn="{first}"] .user').inner_text() == QUESTION
    admin = auth.issue_token("web-test-admin", roles=("user", "admin"))
    async with httpx.AsyncClient(timeout=10) as http:
        r = await http.get(f"{BASE}/api/admin/sessions/{hello['session_id']}",
                           headers={"Authorization": f"Bearer {admin}"})
    assert r.status_code == 200, r.text
    said = [m.get("content") for m in r.json()["messages"] if m.get("role") == "user"]
    assert said[-2:] == [QUESTION, "Hello"], said
