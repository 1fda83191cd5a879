"""The browser voice page (web/, served at /) on the cloud path, in Chinese
and English: headless Chromium (Playwright) against a server whose STT, LLM
and TTS are DashScope paraformer, Qwen (OpenAI-compatible) and CosyVoice,
each the loopback fake of tests/fakes speaking the real wire protocol.

Chinese speech needs the cloud providers: the embedded path is English
(Whisper tiny.en, an English piper voice). The fake recogniser "hears" the
sentence its script says whatever the microphone plays (Chromium's fake
microphone plays a question synthesised by the embedded voice); the fake
synthesiser answers each sentence with a 440 Hz tone at the rate CosyVoice
was asked for, so the page's received audio can be checked for its length,
loudness and pitch: a rate mislabelled anywhere between CosyVoice and the
page's AudioContext would shift the pitch.

Same needs as tests/test_web_page.py (the `playwright` package and Debian's
`chromium`); without them these tests fail, naming what is missing, unless
VA_ALLOW_NO_BROWSER=1."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from actors.audio import silence, write_wav
from tests.browser import wait_for_js
from tests.conftest import run_ingress
from tests.fakes.dashscope_server import AsrScript, FakeDashScope, TtsScript
from tests.fakes.openai_server import FakeOpenAIServer, Script
from tests.test_web_page import (
    _args,
    connect,
    dbfs,
    events,
    page_user_and_limits,
    sign_in,
    text_of,
    turn_pcm,
    type_question,
    wait_turn_done,
)

KEY = "sk-test-web-cloud-0123456789"
COSYVOICE_RATE = 22050
"""CosyVoice's rate in config/cloud-zh.yaml: not the page's 24 kHz, so the server must convert."""
MS_PER_CHAR = 60
HEARD_ZH = "十二乘以七等于多少？"
REPLY_ZH = "十二乘以七等于八十四。还有别的问题吗？"


@pytest.fixture(scope="module")
def fakes():
    with FakeDashScope(api_key=KEY) as dashscope, FakeOpenAIServer(api_key=KEY) as llm:
        yield dashscope, llm


@pytest.fixture(scope="module")
def cloud_web_config(config, fakes):
    """The test config on the three cloud fakes (as config/cloud-zh.yaml, minus
    its espeak fallback), with the browser tests' user."""
    from actors.config import LLMConfig, STTConfig, TTSConfig

    dashscope, llm = fakes
    stt = STTConfig.model_validate({**config.stt.model_dump(), "provider": "dashscope", "fallback": [],
                                    "dashscope": {"websocket_url": dashscope.url, "api_key": KEY,
                                                  "language_hints": ["zh", "en"]}})
    tts = TTSConfig.model_validate({**config.tts.model_dump(), "provider": "dashscope", "fallback": [],
                                    "dashscope": {"websocket_url": dashscope.url, "api_key": KEY,
                                                  "sample_rate": COSYVOICE_RATE}})
    llm_cfg = LLMConfig.model_validate({**config.llm.model_dump(), "provider": "openai-compatible", "fallback": [],
                                        "openai_compat": {"base_url": llm.base_url, "api_key": KEY,
                                                          "model": "qwen-plus"}})
    auth, limits = page_user_and_limits(config, "web-cloud")
    return config.model_copy(update={"stt": stt, "tts": tts, "llm": llm_cfg, "auth": auth, "limits": limits})


@pytest.fixture(scope="module")
def server(ray_cluster, cloud_web_config):
    yield from run_ingress(cloud_web_config, "voice-actors-web-cloud-test")


@pytest.fixture(scope="module")
def question_wav(speech, tmp_path_factory) -> Path:
    """The fake microphone's file (looped): speech for the server's VAD to
    cut, then silence long enough for the reply before it comes round again."""
    path = tmp_path_factory.mktemp("mic") / "question.wav"
    write_wav(path, silence(500) + speech("What is twelve times seven?") + silence(9000), 16000)
    return path


@pytest.fixture(scope="module")
async def browser(chromium_path, question_wav, server):
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=chromium_path, headless=True, args=_args(question_wav))
        try:
            yield b
        finally:
            await b.close()


def pitch_hz(pcm: np.ndarray, rate: int) -> float:
    """The strongest frequency of the signal, to a fraction of a hertz (a
    windowed FFT, zero-padded to four times its length)."""
    window = np.hanning(len(pcm))
    spectrum = np.abs(np.fft.rfft(pcm * window, n=4 * len(pcm)))
    return float(np.argmax(spectrum[1:]) + 1) * rate / (4 * len(pcm))


async def test_a_chinese_spoken_turn_on_the_cloud_providers(page, fakes):
    dashscope, llm = fakes
    dashscope.asr = AsrScript(sentences=[HEARD_ZH], interims_per_sentence=2)
    dashscope.tts = TtsScript(ms_per_char=MS_PER_CHAR)
    llm.default = Script.text(list(REPLY_ZH))
    tasks_before, requests_before = len(dashscope.tasks), len(llm.requests)

    await sign_in(page)
    await page.select_option("#persona", "museum-guide-zh")  # before connecting: the first hello asks for it
    hello = await connect(page)
    rate = hello["audio_out"]["sample_rate"]
    assert rate == await page.evaluate("window.voiceTest.state.outputRate")
    await page.check('input[name="mode"][value="handsfree"]')
    turn = await wait_for_js(page, "() => (window.voiceTest.events.find(e => e.type === 'stt.final') || {}).turn_id",
                             timeout_ms=90_000)
    await page.check('input[name="mode"][value="off"]')  # the fake microphone loops the question
    assert await wait_turn_done(page, spoken=True) == turn
    evs = await events(page)

    # the Chinese transcript as paraformer returned it, and Qwen's Chinese reply, shown as Chinese
    assert text_of(evs, "stt.final", turn) == HEARD_ZH
    reply = text_of(evs, "llm.delta", turn)
    assert reply.replace(" ", "") == REPLY_ZH, reply
    block = page.locator(f'.turn[data-turn="{turn}"]')
    assert (await block.locator(".user").inner_text()).strip() == HEARD_ZH
    shown = block.locator(".reply")
    assert (await shown.inner_text()).strip() == reply.strip()
    assert await shown.get_attribute("lang") == "zh"
    metrics = next(e for e in evs if e["type"] == "metrics" and e["turn_id"] == turn)
    assert metrics["served_by"] == {"stt": "dashscope", "llm": "openai-compatible", "tts": "dashscope"}, metrics
    assert not metrics["interrupted"]

    # the cloud really served it: the page's audio went to paraformer, the zh persona's prompt to Qwen,
    # each sentence to CosyVoice in the persona's voice at CosyVoice's own rate
    tasks = dashscope.tasks[tasks_before:]
    asr = [t for t in tasks if t.kind == "asr"]
    assert asr and len(asr[-1].audio) > 16000 and asr[-1].parameters.get("sample_rate") == 16000
    request = llm.requests[-1]
    assert len(llm.requests) > requests_before and request.messages[-1] == {"role": "user", "content": HEARD_ZH}
    assert "小智" in request.messages[0]["content"]
    tts = [t for t in tasks if t.kind == "tts"]
    spoken = "".join(text for t in tts for text in t.texts)
    assert spoken.replace(" ", "") == REPLY_ZH and len(tts) == 2  # one CosyVoice task per Chinese sentence
    assert {t.parameters.get("sample_rate") for t in tts} == {COSYVOICE_RATE}
    assert {t.parameters.get("voice") for t in tts} == {"longxiaochun_v2"}  # museum-guide-zh's voice
    assert any(e["type"] == "tts.start" and e.get("turn_id") == turn and e["sample_rate"] == rate for e in evs)

    # the audio the page received: as long as CosyVoice's, audible, and still a 440 Hz tone at the page's rate
    pcm = await turn_pcm(page, turn)
    seconds = len(pcm) / rate
    expected = len(spoken) * MS_PER_CHAR / 1000
    assert abs(seconds - expected) < 0.05 * expected, (seconds, expected)
    assert dbfs(pcm) > -20, dbfs(pcm)  # the fake's tone: about -15 dBFS
    assert abs(pitch_hz(pcm, rate) - 440.0) < 3.0, pitch_hz(pcm, rate)
    # ... and played out on the AudioContext's clock, not just stored
    await wait_for_js(page, "n => window.voiceTest.playedSamples >= n", int(len(pcm) * 0.95), timeout_ms=20_000)
    assert await page.evaluate("window.voiceTest.activeSources") == 0


async def test_an_english_question_typed_to_the_cloud_providers(page, fakes):
    dashscope, llm = fakes
    dashscope.tts = TtsScript(ms_per_char=MS_PER_CHAR)
    answer = "Twelve times seven is 84."
    llm.default = Script.text(answer)
    tasks_before = len(dashscope.tasks)

    await sign_in(page)
    await page.select_option("#persona", "museum-guide")
    hello = await connect(page)
    before = await type_question(page, "What is twelve times seven?")
    turn = await wait_turn_done(page, after=before)
    evs = await events(page)
    reply = text_of(evs, "llm.delta", turn)
    assert reply == answer
    shown = page.locator(f'.turn[data-turn="{turn}"] .reply')
    assert (await shown.inner_text()).strip() == answer and await shown.get_attribute("lang") == "en"
    assert llm.requests[-1].messages[-1] == {"role": "user", "content": "What is twelve times seven?"}
    tts = [t for t in dashscope.tasks[tasks_before:] if t.kind == "tts"]
    assert tts and {t.parameters.get("voice") for t in tts} == {"longcheng_v2"}  # museum-guide's voice
    pcm = await turn_pcm(page, turn)
    rate = hello["audio_out"]["sample_rate"]
    assert dbfs(pcm) > -20 and abs(pitch_hz(pcm, rate) - 440.0) < 3.0, (dbfs(pcm), pitch_hz(pcm, rate))
