"""Full spoken turns on the cloud path, over the xiaozhi socket, through the
real Serve proxy: DashScope paraformer (STT) and CosyVoice (TTS) through the
official `dashscope` SDK, Qwen through `AsyncOpenAI`, each against its
loopback fake speaking the real wire protocol (tests/fakes). English and
Chinese (issue 9)."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import pytest
from pydantic import SecretStr

from actors.audio import rms_dbfs, silence
from actors.client import XiaozhiClient
from tests.conftest import INGRESS_PORT, run_ingress
from tests.fakes.dashscope_server import AsrScript, FakeDashScope, TtsScript
from tests.fakes.openai_server import FakeOpenAIServer, Script

BASE = f"http://127.0.0.1:{INGRESS_PORT}"
KEY = "sk-test-cloud-0123456789"
DEVICE = "02:cc:00:00:00:01"


@pytest.fixture(scope="module")
def fakes():
    with FakeDashScope(api_key=KEY) as dashscope, FakeOpenAIServer(api_key=KEY) as llm:
        yield dashscope, llm


@pytest.fixture(scope="module")
def cloud_config(config, fakes):
    from actors.config import LLMConfig, STTConfig, TTSConfig

    dashscope, llm = fakes
    stt = STTConfig.model_validate({**config.stt.model_dump(), "provider": "dashscope",
                                    "dashscope": {"websocket_url": dashscope.url, "api_key": KEY}})
    tts = TTSConfig.model_validate({**config.tts.model_dump(), "provider": "dashscope", "fallback": "none",
                                    "dashscope": {"websocket_url": dashscope.url, "api_key": KEY,
                                                  "sample_rate": 24000}})
    llm_cfg = LLMConfig.model_validate({**config.llm.model_dump(), "provider": "openai-compatible",
                                        "openai_compat": {"base_url": llm.base_url, "api_key": KEY,
                                                          "model": "qwen-plus"}})
    auth = config.auth.model_copy(update={"jwt_secret": SecretStr("cloud-jwt-secret-0123456789abcdef"),
                                          "device_secret": SecretStr("cloud-device-secret-0123456789ab"),
                                          "device_allowlist": [DEVICE], "device_admission": "allowlist"})
    return config.model_copy(update={"stt": stt, "tts": tts, "llm": llm_cfg, "auth": auth})


@pytest.fixture(scope="module")
def server(ray_cluster, cloud_config):
    yield from run_ingress(cloud_config, "voice-actors-cloud")


async def _device() -> dict:
    async with httpx.AsyncClient() as http:
        r = await http.post(f"{BASE}/xiaozhi/ota/", headers={"Device-Id": DEVICE, "Client-Id": DEVICE}, json={})
    assert r.status_code == 200, r.text
    return r.json()["websocket"]


@pytest.mark.parametrize("heard, reply", [
    ("What is twelve times seven?", "Twelve times seven is 84."),
    ("十二乘以七等于多少？", "十二乘以七等于八十四。还有别的问题吗？"),
])
async def test_a_spoken_turn_through_all_three_cloud_providers(server, fakes, speech, heard, reply):
    dashscope, llm = fakes
    dashscope.asr = AsrScript(sentences=[heard], interims_per_sentence=2)
    dashscope.tts = TtsScript(ms_per_char=60)
    llm.default = Script.text(list(reply))  # not enqueue: a preemptive request at a pause may come first
    tasks_before = len(dashscope.tasks)
    ws = await _device()
    async with await XiaozhiClient.connect(ws["url"], ws["token"], DEVICE, client_id=DEVICE) as c:
        turn = await c.ask_audio(silence(300) + speech("What is twelve times seven?"), realtime=True)
    assert turn.transcript == heard
    assert turn.reply.replace(" ", "") == reply.replace(" ", "")
    assert turn.sample_rate == 24000 and len(turn.audio) / 48000 > 0.5 and rms_dbfs(turn.audio) > -35
    # the SDKs really spoke to the fakes: audio streamed to paraformer, the text to Qwen, sentences to CosyVoice
    asr = [t for t in dashscope.tasks[tasks_before:] if t.kind == "asr"]
    assert asr and len(asr[-1].audio) > 16000 and asr[-1].parameters.get("sample_rate") == 16000
    request = llm.requests[-1]
    assert request.authorization == f"Bearer {KEY}" and request.model == "qwen-plus"
    assert request.messages[-1] == {"role": "user", "content": heard}
    tts_texts = [text for t in dashscope.tasks[tasks_before:] if t.kind == "tts" for text in t.texts]
    assert "".join(tts_texts).replace(" ", "") == reply.replace(" ", "")
    if any("\u4e00" <= ch <= "\u9fff" for ch in reply):
        assert len(tts_texts) == 2  # Chinese sentence splitting: one CosyVoice task per sentence


async def test_a_device_talks_in_chinese_and_reads_the_reply_as_it_streams(server, fakes, speech):
    """The xiaozhi messages a device shows: stt with the Chinese transcript, then each sentence."""
    dashscope, llm = fakes
    dashscope.asr = AsrScript(sentences=["今天天气怎么样"])
    llm.default = Script.text(list("今天是晴天。适合去博物馆。"))
    ws = await _device()
    async with await XiaozhiClient.connect(ws["url"], ws["token"], DEVICE, client_id=DEVICE) as c:
        turn = await c.ask_audio(silence(300) + speech("How is the weather today?"), realtime=True)
    texts = [m.get("text") for m in turn.messages if m["type"] == "tts" and m.get("state") == "sentence_start"]
    stt = [m["text"] for m in turn.messages if m["type"] == "stt"]
    assert stt == ["今天天气怎么样"] and texts == ["今天是晴天。", "适合去博物馆。"], (stt, texts)
    assert json.dumps(turn.messages, ensure_ascii=False).count("error") == 0
    await asyncio.sleep(0)


async def test_metrics_count_the_provider_that_served_each_stage(server, fakes, speech):
    """Prometheus counts turns per (stage, provider) of the failover chains, and /health shows
    this replica's circuit breakers."""
    dashscope, llm = fakes
    dashscope.asr = AsrScript(sentences=["what is twelve times seven"])
    llm.default = Script.text("Eighty-four.")
    ws = await _device()
    async with await XiaozhiClient.connect(ws["url"], ws["token"], DEVICE, client_id=DEVICE) as c:
        await c.ask_audio(silence(300) + speech("What is twelve times seven?"), realtime=True)
        await asyncio.sleep(1.0)  # the turn's metrics event follows tts stop
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"{BASE}/metrics")).text
        health = (await http.get(f"{BASE}/health")).json()
    served = _served(text)
    for stage in ("stt", "llm", "tts"):  # the hub outlives apps: other modules' local turns are counted too
        assert served.get(stage, {}).get("dashscope" if stage != "llm" else "openai-compatible", 0) >= 1, served
    assert isinstance(health["breakers"], dict)


def _served(prometheus_text: str) -> dict[str, dict[str, float]]:
    """voice_stage_served_total samples as {stage: {provider: count}}, whatever the label order."""
    served: dict[str, dict[str, float]] = {}
    for line in prometheus_text.splitlines():
        if line.startswith("voice_stage_served_total{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
            served.setdefault(labels["stage"], {})[labels["provider"]] = float(line.rsplit(" ", 1)[1])
    return served


async def test_a_device_keeps_its_memories_across_reconnects_and_actor_restarts(server, fakes, cloud_config):
    """Long-term memory belongs to the device (its principal), not to a session: told once, it is
    in the prompt of a later conversation after the session actor was killed."""
    import ray

    from actors.sessions import find_session

    _, llm = fakes
    llm.default = Script.text("I will remember that.")

    async def say(text: str) -> str:
        ws = await _device()
        async with await XiaozhiClient.connect(ws["url"], ws["token"], DEVICE, client_id=DEVICE, version=3) as c:
            await c.send_json({"type": "listen", "state": "detect", "text": text})
            hello = c.hello
            while True:
                data = await asyncio.wait_for(c.ws.recv(), 30)
                if isinstance(data, bytes):
                    continue  # the reply's audio
                m = json.loads(data)
                if m.get("type") == "tts" and m.get("state") == "stop":
                    return hello["session_id"]

    sid = await say("Remember that my favourite exhibit is the Rosetta Stone.")
    actor = await find_session(cloud_config, sid)
    assert actor is not None
    ray.kill(actor.actor)  # the actor dies; the device's next connection gets a new one
    await asyncio.sleep(0.5)
    llm.default = Script.text("It is the Rosetta Stone.")
    await say("Which exhibit do I like best?")
    system = llm.requests[-1].messages[0]["content"]
    assert "What you remember about this user" in system and "Rosetta Stone" in system, system


async def test_museum_answers_get_the_right_chunk_with_its_source_and_other_questions_get_none(server, fakes):
    _, llm = fakes
    llm.default = Script.text("Noted.")
    ws = await _device()
    async with await XiaozhiClient.connect(ws["url"], ws["token"], DEVICE, client_id=DEVICE, version=3) as c:
        for question in ("Tell me about the Rosetta Stone.", "What's the best pizza in Naples?"):
            await c.send_json({"type": "listen", "state": "detect", "text": question})
            while True:
                data = await asyncio.wait_for(c.ws.recv(), 30)
                if isinstance(data, str) and json.loads(data).get("state") == "stop":
                    break
    museum, pizza = (r.messages[0]["content"] for r in llm.requests[-2:])
    assert "[1] museum.yaml › Rosetta Stone" in museum, museum
    assert "nothing relevant was found" in pizza and "[1]" not in pizza
