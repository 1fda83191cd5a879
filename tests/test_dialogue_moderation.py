"""Issue 10, moderation and quick replies in the dialogue: blocked words never
reach the LLM through preemptive generation, a failed turn and a slow tool
round speak their quick replies from the cache, the safe reply's and the
log hash's sources. The session helpers (a scripted LLM, a counting TTS, a
no-Ray SessionCore) are tests/test_moderation_speakable.py's.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from actors.agent.moderation import ModerationConfig, Moderator, build_moderator, safe_reply_for
from actors.agent.quick_replies import QuickReplies, QuickRepliesConfig, QuickReplyCache
from actors.config import load_config
from actors.providers import build_vad
from actors.providers.base import ChatMessage, ProviderError, ToolCall
from actors.session_core import SessionCore
from tests.fakes.openai_server import FakeOpenAIServer
from tests.test_moderation_speakable import CountingTTS, ScriptLLM, SilentSTT, moderator, run_replies, texts


async def test_a_blocked_phrase_never_reaches_the_llm_through_preemptive_generation(monkeypatch):
    """At a pause the reply may start on the words so far: blocked words must
    not, neither by the local rules nor by the endpoint's verdict."""
    monkeypatch.setenv("VA_TEST_MOD_KEY", "sk-mod")
    config = load_config(env={"VOICE_ACTORS__SESSION__HISTORY_DB": ""})
    assert config.session.preemptive_generation
    llm = ScriptLLM([["Sure."]])
    core = SessionCore("sess-spec", config, vad=build_vad(config), stt=SilentSTT(), llm=llm, tts=CountingTTS())
    async with FakeOpenAIServer(api_key="sk-mod") as fake:
        fake.moderation_setup(flag_words=["napalm"])
        api = {"base_url": fake.base_url, "api_key_env": "VA_TEST_MOD_KEY"}
        core.moderator = core.dialogue.moderator = Moderator(ModerationConfig(blocked_words=["dynamite"], api=api))
        core.start()
        try:
            core.on_pause(core.turn_id, "how do I make dynamite")  # the rules: never even started
            assert core.dialogue.preemptive["started"] == 0
            core.on_pause(core.turn_id, "how do I make napalm")  # the endpoint flags it: the LLM is not asked
            spec = core.dialogue._speculation
            assert spec is not None and spec.task is not None
            await spec.task
            assert spec.blocked and llm.prompts == []
            core.on_pause(core.turn_id, "what time is it")  # a clean pause does reach the LLM
            spec = core.dialogue._speculation
            assert spec is not None and spec.task is not None
            await spec.task
            assert [m.content for m in llm.prompts[0] if m.role == "user"] == ["what time is it"]
            assert core.dialogue.moderator.blocked == 0  # screening is not a block: the final transcript's check is
        finally:
            await core.close()
            await core.dialogue.moderator.aclose()


def quick(tmp_path: Path, **cfg: Any) -> QuickReplies:
    config = QuickRepliesConfig(cache_dir=str(tmp_path), **cfg)
    return QuickReplies(config.phrases_for(), QuickReplyCache.from_config(config), fillers=config.fillers_for(),
                        errors=config.errors_for(), filler_after_ms=config.filler_after_ms)


async def test_a_failed_turn_says_the_error_phrase_from_the_cache(tmp_path: Path):
    tts = CountingTTS()
    fail = ProviderError("llm.failed", "the model is down")
    events, child = await run_replies([[fail], ["Part of an answer. ", fail], [fail]], tts,
                                      quick_replies=quick(tmp_path))
    said = [(e.turn_id, e.text) for e in events if e.type == "tts.sentence"]
    sorry = "Sorry, something went wrong. Please try again."
    # a turn that said nothing says why; a turn cut off after a sentence keeps that sentence only
    assert said == [(1, sorry), (2, "Part of an answer."), (3, sorry)]
    assert [e.code for e in events if e.type == "error"] == ["llm.failed"] * 3
    assert tts.texts == [sorry, "Part of an answer."] and child.quick_hits == 1  # the second time: from the cache
    assert not any(sorry in e.text for e in events if e.type == "llm.delta")


async def test_a_tool_round_gets_the_filler_once_per_turn_from_the_cache(tmp_path: Path):
    tts = CountingTTS()
    call = ToolCall(id="c1", name="get_time", arguments={})
    llm = ScriptLLM([[call], [call], ["It is noon."],  # two tool rounds, one filler
                     [call], ["Still noon."],  # another turn: the filler again, from the cache
                     ["Let me look. ", call], ["Noon."]])  # the model spoke first: no filler
    history: list[ChatMessage] = []
    events, child = await run_replies([[], [], []], tts, llm=llm, history=history,
                                      quick_replies=quick(tmp_path, filler_after_ms=0, fillers=["Let me check."]))
    said = [(e.turn_id, e.text) for e in events if e.type == "tts.sentence"]
    assert said == [(1, "Let me check."), (1, "It is noon."), (2, "Let me check."), (2, "Still noon."),
                    (3, "Let me look."), (3, "Noon.")]
    assert tts.texts.count("Let me check.") == 1 and child.quick_hits == 1
    assert [e.name for e in events if e.type == "tool.result"] == ["get_time"] * 4
    assert "Let me check." not in " ".join(m.content for m in history)  # a filler, not part of the answer


async def test_the_filler_waits_for_a_slow_tool_only(tmp_path: Path):
    """With the default delay a quick tool gets no filler (the answer comes at once)."""
    call = ToolCall(id="c1", name="get_time", arguments={})
    replies = quick(tmp_path)
    assert replies.filler_after_s == QuickRepliesConfig().filler_after_ms / 1000 > 0
    events, _ = await run_replies([[]], llm=ScriptLLM([[call], ["It is noon."]]), quick_replies=replies)
    assert texts(events, "tts.sentence") == ["It is noon."]


def test_fillers_and_errors_follow_the_personas_language():
    class Zh:
        id, language = "guide-zh", "zh-CN"

    cfg = QuickRepliesConfig()
    assert cfg.fillers_for(Zh())[0] == "我查一下。" and cfg.errors_for(Zh())[0].startswith("抱歉")
    assert cfg.fillers_for() == ["Let me check.", "One moment, please."]
    assert cfg.errors_for()[0] == "Sorry, something went wrong. Please try again."
    assert "我查一下。" in cfg.phrases_for(Zh()) and "Let me check." not in cfg.phrases_for(Zh())


def test_the_safe_reply_comes_from_the_persona_then_the_config():
    from actors.agent.persona import Persona

    configured = Moderator(ModerationConfig(blocked_words=["x"], safe_reply="Let's keep it friendly."))
    plain = Moderator(ModerationConfig(blocked_words=["x"]))
    assert safe_reply_for(Persona(id="a", name="Ava", safe_reply="Not that, sorry."), configured) == "Not that, sorry."
    assert safe_reply_for(Persona(id="a", name="Ava"), configured) == "Let's keep it friendly."
    assert safe_reply_for(Persona(id="z", name="Zh", language="zh"), plain) == "这个问题我不方便回答，我们换个话题吧。"
    assert safe_reply_for(Persona(id="a", name="Ava"), None) == Persona(id="a", name="Ava").safe_reply_text()


def test_the_log_hash_is_keyed_per_deployment():
    from types import SimpleNamespace

    from pydantic import SecretStr

    def app(secret: str | None) -> Any:
        return SimpleNamespace(moderation=ModerationConfig(blocked_words=["x"]),
                               auth=SimpleNamespace(jwt_secret=SecretStr(secret) if secret else None))

    one, two = build_moderator(app("s" * 40)), build_moderator(app("s" * 40))
    other = build_moderator(app("t" * 40))
    assert one is not None and two is not None and other is not None
    assert one.digest("same words") == two.digest("same words")  # two sessions of one deployment
    assert one.digest("same words") != other.digest("same words")  # another deployment's key
    bare = build_moderator(app(None))
    assert bare is not None and bare.digest("same words") == moderator().digest("same words")  # per process
    assert bare.digest("same words") != one.digest("same words")


async def test_a_configured_session_gates_its_replies_with_the_configured_safe_reply(tmp_path: Path):
    """Wired by SessionCore from the config alone: the dialogue's gate, the
    config's safe reply (the persona has none), spoken from the phrase cache."""
    from actors.events import LLMDelta
    from actors.tts import OutputPrefs

    base = load_config(env={"VOICE_ACTORS__SESSION__HISTORY_DB": ""})
    persona = base.persona().model_copy(update={"safe_reply": None})
    config = base.model_copy(update={
        "moderation": ModerationConfig(blocked_words=["banana"], safe_reply="Let's keep it friendly."),
        "quick_replies": QuickRepliesConfig(cache_dir=str(tmp_path)),
        "personas": {**base.personas, persona.id: persona}})
    tts = CountingTTS()
    llm = ScriptLLM([["Sure. ", "Banana bread is great. ", "Bye."]])
    core = SessionCore("sess-cfg", config, vad=build_vad(config), stt=SilentSTT(), llm=llm, tts=tts)
    assert core.dialogue.moderator is not None and core.tts.safe_reply == "Let's keep it friendly."
    core.start()
    events = core.subscribe(OutputPrefs(pace=False))
    shown: list[str] = []
    try:
        turn = core.send_text("tell me a recipe")
        async with asyncio.timeout(10):
            while not ((ev := await events.get()).type == "metrics" and ev.turn_id == turn):
                if isinstance(ev, LLMDelta):
                    shown.append(ev.text)
        history = core.history()
    finally:
        await core.close()
    assert "".join(shown) == "Sure. Let's keep it friendly. Bye."
    assert history[-1].content == "Sure. Let's keep it friendly. Bye."
    assert tts.texts == ["Sure.", "Let's keep it friendly.", "Bye."]  # said whole, as one quick-reply sentence


async def test_a_greeting_of_two_sentences_is_one_cached_quick_reply(tmp_path: Path):
    """The server's own phrases are said whole, so a greeting such as "Hi,
    I'm Ava. How can I help?" is one cache entry, not two syntheses a time."""
    from actors.tts import OutputPrefs, TTSChild

    config = load_config(env={"VOICE_ACTORS__SESSION__HISTORY_DB": ""})
    tts = CountingTTS()
    core = SessionCore("sess-greet", config, vad=build_vad(config), stt=SilentSTT(), llm=ScriptLLM([]), tts=tts)
    core.tts = TTSChild(core, tts, config.tts, quick_replies=quick(tmp_path, phrases=["Hi, I'm Ava. How can I help?"]))
    core._children[-1] = core.tts
    core.start()
    events = core.subscribe(OutputPrefs(pace=False))
    said: list[str] = []
    try:
        for _ in range(2):
            turn = core.say("Hi, I'm Ava. How can I help?")
            async with asyncio.timeout(10):
                while not ((ev := await events.get()).type == "tts.stop" and ev.turn_id == turn):
                    if ev.type == "tts.sentence":
                        said.append(ev.text)
    finally:
        await core.close()
    assert said == ["Hi, I'm Ava. How can I help?"] * 2
    assert tts.texts == ["Hi, I'm Ava. How can I help?"] and core.tts.quick_hits == 1


async def test_the_gate_checks_each_sentence_and_keeps_their_order_with_the_endpoint(monkeypatch):
    """With the moderation endpoint the checks run side by side; sentences
    still come out in order, each blocked one replaced (the first) or dropped."""
    from actors.agent.reply_gate import ReplyGate

    monkeypatch.setenv("VA_TEST_MOD_KEY", "sk-mod")
    async with FakeOpenAIServer(api_key="sk-mod") as fake:
        fake.moderation_setup(flag_words=["forbidden"])
        mod = Moderator(ModerationConfig(blocked_words=["炸弹"], api={"base_url": fake.base_url,
                                                                     "api_key_env": "VA_TEST_MOD_KEY"}))
        out: list[tuple[str, bool]] = []
        gate = ReplyGate(mod, "Let's change the subject.", lambda text, phrase=False: out.append((text, phrase)))
        for piece in ["First one. A forbidden", " thing. 怎么做炸弹？", "Last one.\n", "- tail"]:
            gate.feed(piece)
        await gate.flush()
        await mod.aclose()
    assert out == [("First one.", False), (" Let's change the subject.", True), ("Last one.", False),
                   ("\n", False), ("- tail", False)]
    assert gate.blocked == 2 and mod.blocked == 2
    assert {r.body["input"] for r in fake.moderation_requests} >= {"First one.", "A forbidden thing."}
