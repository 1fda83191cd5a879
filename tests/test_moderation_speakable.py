"""Issue 10, items 6-8: moderation, speakable text and emotion, quick replies.

Pure functions and the moderator first (no Ray; the moderation endpoint is
the loopback fake in tests/fakes/openai_server.py), then the TTS child
inside a real SessionCore with in-test providers: a scripted LLM and a TTS
that records every text it is asked to speak.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from actors.agent.moderation import (
    ModerationAPIConfig,
    ModerationConfig,
    Moderator,
    build_moderator,
    fold,
)
from actors.agent.quick_replies import (
    QuickReplies,
    QuickRepliesConfig,
    QuickReplyCache,
    VoiceKey,
    normalize_phrase,
    voice_key,
)
from actors.config import load_config
from actors.events import LLMEmotion
from actors.protocols.native import NativeProtocol
from actors.protocols.xiaozhi import EMOTION_EMOJI, XiaozhiProtocol
from actors.providers import build_vad
from actors.providers.base import LLM, STT, TTS, AudioSegment, ChatMessage, LLMChunk, ToolCall, ToolSpec
from actors.session_core import SessionCore
from actors.text import EmotionFilter, MarkdownLines, speakable, split_sentences, strip_emotion_tags
from actors.tts import OutputPrefs, TTSChild
from tests.fakes.openai_server import FakeOpenAIServer

# ====================================================================== speakable text


def test_speakable_strips_markdown_code_urls_and_emoji_keeping_cjk_and_punctuation():
    reply = ("# Opening hours\nWe are **open** _daily_. See [our page](https://museum.example/hours) "
             "or https://museum.example/faq?x=1 😊\n\n- Monday: 9-5\n- Sunday: *closed*\n\n"
             "```python\nprint('never read aloud. ever.')\n```\n"
             "| Room | Floor |\n|---|---|\n| Egypt | 2 |\n"
             "Run `pip install va` then ~~old~~ new. 3 * 4 = 12 and my_var stays.")
    said = speakable(reply)
    assert said == ("Opening hours. We are open daily. See our page or Monday: 9-5. Sunday: closed. "
                    "Room, Floor. Egypt, 2. Run pip install va then old new. 3 * 4 = 12 and my_var stays.")
    for gone in ("**", "*c", "#", "http", "`", "print", "😊", "|", "[", "]("):
        assert gone not in said
    assert speakable("你好！😊 我是**小智**。详情见 https://a.cn/x 。") == "你好！我是小智。详情见。"
    assert speakable("x<y and y>z, line<br/>two") == "x<y and y>z, line two"
    assert speakable("😊🎉") == "" and speakable("https://only.a.link/") == ""


def test_markdown_lines_streamed_a_character_at_a_time_say_the_same():
    text = "## 展品\n- 罗塞塔石碑\n- 木乃伊\n```\ncode. here.\n```\n1. First\n2) Second\nPlain text\nwraps here.\n"
    whole = MarkdownLines()
    at_once = whole.feed(text) + whole.flush()
    streamed = MarkdownLines()
    pieces = "".join(streamed.feed(ch) for ch in text) + streamed.flush()
    assert pieces == at_once
    assert split_sentences(pieces) == ["展品。", "罗塞塔石碑。", "木乃伊。", "First.", "Second.",
                                       "Plain text wraps here."]


def test_a_very_long_table_row_is_not_held_forever():
    lines = MarkdownLines()
    out = lines.feed("|" + "x" * 3000)
    assert out.startswith("|x") and len(out) > 2000  # past MAX_HELD_LINE it is passed on as text


# ====================================================================== emotion


def test_emotion_filter_takes_tags_out_even_across_chunks_and_reports_the_first_once():
    f = EmotionFilter()
    out = [f.feed(c) for c in ["[hap", "py] Hello (see", " below) there ", "<emotion:sad> ok 😂"]]
    out.append(f.flush())
    assert "".join(t for t, _ in out) == "Hello (see below) there ok 😂"
    assert [e for _, e in out if e] == ["happy"]


@pytest.mark.parametrize(("text", "emotion"), [
    ("(laughing) That's a good one.", "laughing"),
    ("<emotion:sad>I'm sorry.", "sad"),
    ("[smile] Hi!", "happy"),
    ("Sure! 🤔 Let me think.", "thinking"),
    ("Here you go 🎨 😂", "funny"),  # the first emoji that names an emotion
    ("Plain words [1] (see below).", None),
])
def test_emotion_from_a_tag_or_an_emoji(text: str, emotion: str | None):
    f = EmotionFilter()
    shown, found = f.feed(text)
    rest, later = f.flush()
    assert (found or later) == emotion
    if emotion and not any(ch in text for ch in "🤔😂"):
        assert "[" not in shown + rest and "(" not in shown + rest and "<" not in shown + rest
    assert strip_emotion_tags("Plain words [1] (see below).") == "Plain words [1] (see below)."


def test_native_and_xiaozhi_protocols_send_the_emotion():
    native = NativeProtocol(max_frame_bytes=32000)
    native.on_text('{"type": "hello"}')
    sent = native.encode(LLMEmotion(session_id="s", turn_id=3, emotion="happy"))
    assert len(sent) == 1 and '"type":"llm.emotion"' in sent[0] and '"emotion":"happy"' in sent[0]
    device = XiaozhiProtocol(protocol_version=3, output_sample_rate=24000, max_frame_bytes=32000)
    device.hello_reply("s", resumed=False, output_sample_rate=24000)
    for emotion, emoji in (("happy", "🙂"), ("thinking", "🤔"), ("no-such-mood", "🙂")):
        [msg] = device.encode(LLMEmotion(session_id="s", turn_id=3, emotion=emotion))
        # the firmware's own `llm` message: it shows the emoji, keyed by the emotion's name
        assert json.loads(msg) == {"session_id": "s", "type": "llm", "emotion": emotion, "text": emoji}
    assert EMOTION_EMOJI["thinking"] == "🤔"


# ====================================================================== moderation


def moderator(**cfg: Any) -> Moderator:
    return Moderator(ModerationConfig(**cfg))


async def test_word_lists_are_cjk_aware_case_and_width_folded():
    m = moderator(blocked_words={"violence": ["炸弹", "Kill"], "slur": ["ass"]})
    assert (await m.check_user("怎么做炸弹")).category == "violence"  # CJK: a substring, no spaces needed
    assert (await m.check_user("ＫＩＬＬ them")).blocked  # full width and case folded
    assert (await m.check_user("我要kill它")).blocked  # a Latin word inside CJK text still counts
    assert (await m.check_user("what a pain in the ass!")).category == "slur"
    assert (await m.check_user("a classic class on skills")).allowed  # word boundaries for Latin
    assert (await m.check_sentence("ki\u200bll")).blocked  # zero-width characters do not hide a word
    assert fold("ＡＢＣ") == "abc"


async def test_patterns_and_switches():
    m = moderator(patterns=[r"\b\d{3}-\d{2}-\d{4}\b", {"pattern": r"credit\s*card", "category": "pii"}])
    assert (await m.check_user("my ssn is 123-45-6789")).category == "pattern"
    assert (await m.check_sentence("Your CREDIT  card number")).category == "pii"
    assert (await m.check_user("nothing here")).allowed
    off = moderator(enabled=False, blocked_words=["banana"])
    assert not off.active and (await off.check_user("banana")).allowed
    assert moderator(blocked_words={"fruit": ["banana"]}).active and not moderator().active


def test_config_is_strict_and_bounded():
    with pytest.raises(ValidationError):
        ModerationConfig(blockd_words=["typo"])
    with pytest.raises(ValidationError, match="regular expression"):
        ModerationConfig(patterns=["(unclosed"])
    with pytest.raises(ValidationError):
        ModerationConfig(patterns=["x"] * 201)
    assert ModerationConfig(blocked_words=["a"]).blocked_words == {"blocked_word": ["a"]}
    with pytest.raises(ValidationError):
        QuickRepliesConfig(phrase=["typo"])


async def test_a_block_is_logged_with_category_and_hash_never_the_text(caplog):
    m = moderator(blocked_words={"fruit": ["banana"]})
    with caplog.at_level(logging.WARNING, logger="actors.agent.moderation"):
        verdict = await m.check_user("my secret banana recipe")
    assert verdict.blocked and len(verdict.digest) == 12
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "fruit" in logged and verdict.digest in logged
    assert "banana" not in logged and "recipe" not in logged
    assert m.digest("same") == m.digest("same") != m.digest("other")


async def test_moderation_endpoint_flags_and_fails_open_or_closed(monkeypatch):
    monkeypatch.setenv("VA_TEST_MOD_KEY", "sk-mod")
    async with FakeOpenAIServer(api_key="sk-mod") as fake:
        fake.moderation_setup(flag_words=["forbidden"], flag_categories={"forbidden": "violence"})
        api = {"base_url": fake.base_url, "api_key_env": "VA_TEST_MOD_KEY", "model": "mod-1", "timeout_s": 0.5}
        m = moderator(api=api)
        assert m.active
        blocked = await m.check_sentence("this is forbidden talk")
        assert blocked.blocked and blocked.category == "violence" and blocked.source == "api"
        assert (await m.check_user("a kind word")).allowed
        sent = fake.moderation_requests[0]
        assert sent.authorization == "Bearer sk-mod" and sent.body == {"model": "mod-1",
                                                                       "input": "this is forbidden talk"}
        await m.check_sentence("this is forbidden talk")  # a repeat is answered from the verdict cache
        assert len(fake.moderation_requests) == 2
        only_hate = moderator(api={**api, "categories": ["hate"]})
        assert (await only_hate.check_user("forbidden")).allowed  # flagged, but not a category we block on

        fake.moderation_setup(status=503)
        fail_open, fail_closed = moderator(api=api), moderator(api={**api, "on_error": "block"})
        assert (await fail_open.check_user("anything")).allowed and fail_open.api_errors == 1
        closed = await fail_closed.check_user("anything")
        assert closed.blocked and closed.category == "moderation_unavailable"

        fake.moderation_setup(delay_s=2.0)
        slow = moderator(api=api)
        assert (await slow.check_user("slow")).allowed  # the answer came too late: fail open
        assert slow.api_errors == 1  # the timeout was the reason, not a late "allowed" answer
        assert not fake.moderation_requests[-1].completed  # the request was abandoned, not waited out
        await slow.aclose()
        words_first = moderator(api=api, blocked_words=["slow"])
        before = len(fake.moderation_requests)
        assert (await words_first.check_user("slow")).source == "words"  # local rules answer without a call
        assert len(fake.moderation_requests) == before
        for m_ in (m, only_hate, fail_open, fail_closed, words_first):
            await m_.aclose()
    assert ModerationAPIConfig().on_error == "allow"


# ====================================================================== quick-reply cache


class CountingTTS(TTS):
    label = "counting"
    voice = "v1"
    sample_rate = 16000

    def __init__(self) -> None:
        self.texts: list[str] = []

    async def synthesize(self, text: str) -> AudioSegment:
        self.texts.append(text)
        n = 1600 + 80 * len(text)  # 0.1 s plus a little per character
        return AudioSegment((b"\x10\x02" * n), self.sample_rate)


async def test_cache_memory_then_disk_then_tts(tmp_path: Path):
    tts = CountingTTS()
    cache = QuickReplyCache(tmp_path, memory_bytes=1 << 20, disk_bytes=1 << 20)
    first = await cache.get_or_synthesize(tts, "Let me check.")
    again = await cache.get_or_synthesize(tts, "Let me check.")
    assert tts.texts == ["Let me check."] and again.pcm16 == first.pcm16
    assert cache.stats == {"memory_hits": 1, "disk_hits": 0, "synthesized": 1}
    fresh = QuickReplyCache(tmp_path)  # another process on the same machine
    from_disk = await fresh.get_or_synthesize(tts, "Let me check.")
    assert tts.texts == ["Let me check."] and from_disk == first and fresh.stats["disk_hits"] == 1
    other_voice = VoiceKey("counting", "v2", 16000)
    await fresh.get_or_synthesize(tts, "Let me check.", other_voice)
    assert len(tts.texts) == 2  # another voice is another entry
    assert not list(tmp_path.glob(".tmp-*")) and len(list(tmp_path.glob("*.wav"))) == 2
    assert voice_key(tts) == VoiceKey("counting", "v1", 16000)


async def test_cache_layers_are_bounded(tmp_path: Path):
    tts = CountingTTS()
    one = len((await tts.synthesize("x" * 10)).pcm16)
    cache = QuickReplyCache(tmp_path, memory_bytes=int(one * 2.5), disk_bytes=3 * (one + 100))
    for i in range(6):
        await cache.get_or_synthesize(tts, f"phrase {i:05d}")
    assert cache.memory_used <= int(one * 2.5)
    assert sum(p.stat().st_size for p in tmp_path.glob("*.wav")) <= 3 * (one + 100)
    (tmp_path / (QuickReplyCache.digest(VoiceKey("counting", "v1", 16000), "broken") + ".wav")).write_bytes(b"junk")
    await QuickReplyCache(tmp_path).get_or_synthesize(tts, "broken")  # a damaged file is synthesised again
    assert tts.texts[-1] == "broken"


async def test_concurrent_first_uses_synthesise_once(tmp_path: Path):
    tts = CountingTTS()
    cache = QuickReplyCache(tmp_path)
    results = await asyncio.gather(*(cache.get_or_synthesize(tts, "One moment, please.") for _ in range(5)))
    assert tts.texts == ["One moment, please."] and len({r.pcm16 for r in results}) == 1


def test_phrases_match_after_normalisation():
    class P:
        id = "guide"

        def greeting_text(self) -> str:
            return "Hi, I'm Ava. How can I help?"

        def safe_reply_text(self) -> str:
            return "我们换个话题吧。"

    cfg = QuickRepliesConfig(personas={"guide": ["Welcome to the museum!"]})
    quick = QuickReplies(cfg.phrases_for(P()), QuickReplyCache(None))
    assert quick.match("let me CHECK") == "Let me check."
    assert quick.match("Hi, I’m Ava — how can I help") == "Hi, I'm Ava. How can I help?"
    assert quick.match("我们 换个话题吧") == "我们换个话题吧。"
    assert quick.match("Welcome to the museum.") == "Welcome to the museum!"
    assert quick.match("Let me check the hours.") is None
    assert normalize_phrase("Ｓｏｒｒｙ!") == "sorry"


# ====================================================================== through the TTS child


class SilentSTT(STT):
    async def transcribe(self, pcm16: bytes) -> str:
        return ""


class ScriptLLM(LLM):
    """Each call streams the next reply, one chunk per list item (a
    `ToolCall` item asks for a tool, an exception item is raised); every
    prompt it was given is kept in `prompts`."""

    def __init__(self, replies: list[list[Any]]) -> None:
        self._replies = list(replies)
        self.prompts: list[list[ChatMessage]] = []

    async def stream(self, messages: list[ChatMessage], tools: list[ToolSpec]) -> AsyncIterator[LLMChunk]:
        self.prompts.append(list(messages))
        for piece in self._replies.pop(0):
            await asyncio.sleep(0)
            if isinstance(piece, BaseException):
                raise piece
            yield LLMChunk(tool_call=piece) if isinstance(piece, ToolCall) else LLMChunk(text=piece)


async def run_replies(replies: list[list[Any]], tts: TTS | None = None, llm: ScriptLLM | None = None,
                      history: list[ChatMessage] | None = None, **child: Any) -> tuple[list[Any], TTSChild]:
    """Each reply as one turn of a no-Ray session whose TTS child is built
    with `child`'s arguments (a `moderator` also moderates the dialogue, as
    in a configured session); → every event and the child. `history` gets
    the session's history at the end."""
    config = load_config(env={"VOICE_ACTORS__SESSION__HISTORY_DB": ""})
    tts = tts or CountingTTS()
    llm = llm or ScriptLLM(replies)
    core = SessionCore("sess-mod", config, vad=build_vad(config), stt=SilentSTT(), llm=llm, tts=tts)
    core.tts = TTSChild(core, tts, config.tts, **child)
    core._children[-1] = core.tts
    core.moderator = core.dialogue.moderator = child.get("moderator")
    core.start()
    events_q = core.subscribe(OutputPrefs(pace=False))
    events: list[Any] = []
    try:
        for i in range(len(replies)):
            turn = core.send_text(f"question {i}")
            async with asyncio.timeout(10):
                while not ((ev := await events_q.get()).type == "metrics" and ev.turn_id == turn):
                    events.append(ev)
        if history is not None:
            history.extend(core.history())
    finally:
        await core.close()
    return events, core.tts


def texts(events: list[Any], kind: str) -> list[str]:
    return [e.text for e in events if e.type == kind]


async def test_a_blocked_reply_sentence_becomes_the_safe_reply_said_once():
    tts = CountingTTS()
    mod = Moderator(ModerationConfig(blocked_words={"fruit": ["banana"]}))
    llm = ScriptLLM([["Hello there. ", "The secret is BA", "NANA. ", "Also banana again. ", "Goodbye now."],
                     ["Anything else?"]])
    history: list[ChatMessage] = []
    events, child = await run_replies([[], []], tts, llm=llm, history=history, moderator=mod,
                                      safe_reply="Let's talk about something else.")
    assert tts.texts == ["Hello there.", "Let's talk about something else.", "Goodbye now.", "Anything else?"]
    assert texts(events, "tts.sentence") == tts.texts  # what was said, not what was written
    shown = "".join(e.text for e in events if e.type == "llm.delta" and e.turn_id == 1)
    assert shown == "Hello there. Let's talk about something else. Goodbye now."  # the client sees what is said
    replies = [m.content for m in history if m.role == "assistant"]
    assert replies[0] == shown  # the history keeps what was said
    next_prompt = " ".join(m.content for m in llm.prompts[1])
    assert "Let's talk about something else." in next_prompt
    assert "banana" not in next_prompt.lower() and "banana" not in " ".join(replies).lower()
    assert mod.blocked == 2 and child.moderated == 0  # checked once, before the TTS; not again there


async def test_a_markdown_split_word_is_still_caught_and_a_clean_reply_streams_unchanged():
    mod = Moderator(ModerationConfig(blocked_words=["banana"]))
    events, _ = await run_replies([["It is **ban**ana time.\n", "- next line"], ["Plain ", "words ", "here"]],
                                  moderator=mod, safe_reply="No.")
    first = "".join(e.text for e in events if e.type == "llm.delta" and e.turn_id == 1)
    assert first == "No.\n- next line"
    second = [e.text for e in events if e.type == "llm.delta" and e.turn_id == 2]
    assert "".join(second) == "Plain words here"


async def test_speakable_text_reaches_the_tts_while_the_client_gets_the_original():
    tts = CountingTTS()
    reply = ["**Welcome!** ", "See [the map](https://museum.example/map) 🗺️ now.\n", "```\nsecret()\n```\n",
             "- Room `A1`\n", "- Room B"]
    events, _ = await run_replies([reply], tts)
    assert tts.texts == ["Welcome!", "See the map now.", "Room A1.", "Room B."]
    assert "".join(texts(events, "llm.delta")) == "".join(reply)


async def test_a_cited_source_is_shown_not_spoken():
    tts = CountingTTS()
    reply = ["It is in Gallery 1. ", "Source: museum.yaml › Rosetta Stone. ", "[2] Sources: a.md, b.txt. ",
             "来源：museum.yaml。", "The source: a river."]
    events, _ = await run_replies([reply], tts)
    assert tts.texts == ["It is in Gallery 1.", "The source: a river."]
    assert "".join(texts(events, "llm.delta")) == "".join(reply)


async def test_a_tag_or_emoji_makes_one_emotion_event_and_the_tag_is_not_spoken():
    tts = CountingTTS()
    events, _ = await run_replies([["[hap", "py] Great to see you! ", "😊 Ask me anything. (laughing)"],
                                   ["That is so funny 😂 really. ", "🙄 Fine."]], tts)
    emotions = [(e.turn_id, e.emotion) for e in events if e.type == "llm.emotion"]
    assert emotions == [(1, "happy"), (2, "funny")]
    assert tts.texts == ["Great to see you!", "Ask me anything.", "That is so funny really.", "Fine."]


async def test_a_quick_reply_plays_from_the_cache_with_no_tts_call(tmp_path: Path):
    tts = CountingTTS()
    cfg = QuickRepliesConfig(cache_dir=str(tmp_path))
    quick = QuickReplies(cfg.phrases_for(), QuickReplyCache.from_config(cfg))
    events, child = await run_replies([["Let me check. ", "It is open."], ["let me check!"]], tts,
                                      quick_replies=quick)
    assert tts.texts == ["Let me check.", "It is open."]  # the second "let me check" cost no TTS call
    assert child.quick_hits == 1 and child.synthesized == 2
    assert texts(events, "tts.sentence") == ["Let me check.", "It is open.", "let me check!"]
    audio = [e for e in events if e.type == "tts.audio"]
    assert audio and {e.turn_id for e in audio} == {1, 2}
    # a new cache object on the same directory (another session process): still no call
    tts2 = CountingTTS()
    quick2 = QuickReplies(cfg.phrases_for(), QuickReplyCache.from_config(cfg))
    _, child2 = await run_replies([["Let me check."]], tts2, quick_replies=quick2)
    assert tts2.texts == [] and child2.quick_hits == 1


async def test_the_safe_reply_is_itself_a_quick_reply(tmp_path: Path):
    tts = CountingTTS()
    mod = Moderator(ModerationConfig(blocked_words=["banana"], safe_reply="Let's change the subject."))
    quick = QuickReplies([], QuickReplyCache(tmp_path))
    _, child = await run_replies([["Banana time."], ["More banana."]], tts, moderator=mod, quick_replies=quick)
    assert tts.texts == ["Let's change the subject."] and child.quick_hits == 1


def test_builders_read_the_app_config_sections_when_present(tmp_path: Path):
    from types import SimpleNamespace

    from actors.agent.quick_replies import build_quick_replies, voice_key_from_config

    config = load_config(env={"VOICE_ACTORS__SESSION__HISTORY_DB": ""})
    assert build_moderator(config) is None, "the shipped config has no rules: nothing to check"
    assert build_quick_replies(config) is not None, "quick replies are on by default"
    app = SimpleNamespace(tts=config.tts, resolve_path=config.resolve_path,
                          moderation=ModerationConfig(blocked_words=["banana"]),
                          quick_replies=QuickRepliesConfig(cache_dir=str(tmp_path)))
    assert build_moderator(app) is not None
    assert build_moderator(SimpleNamespace(moderation=ModerationConfig())) is None  # nothing to check
    quick = build_quick_replies(app, SimpleNamespace(id="x", voices={config.tts.provider: "joe"}))
    assert quick is not None and quick.key == VoiceKey(config.tts.provider, "joe", 0)
    assert quick.match("Let me check") == "Let me check."
    assert voice_key_from_config(app).provider == config.tts.provider


async def test_what_the_user_heard_of_an_interrupted_reply_is_the_safe_reply_not_the_blocked_words():
    config = load_config(env={"VOICE_ACTORS__SESSION__HISTORY_DB": ""})
    tts = CountingTTS()
    llm = ScriptLLM([["Banana is the answer. ", "And then a much longer sentence that keeps on going for a while."]])
    core = SessionCore("sess-heard", config, vad=build_vad(config), stt=SilentSTT(), llm=llm, tts=tts)
    core.tts = TTSChild(core, tts, config.tts, moderator=Moderator(ModerationConfig(blocked_words=["banana"])),
                        safe_reply="Let's talk about art.")
    core._children[-1] = core.tts
    core.start()
    events_q = core.subscribe(OutputPrefs(pace=True))
    try:
        turn = core.send_text("question")
        async with asyncio.timeout(10):
            while not ((ev := await events_q.get()).type == "tts.sentence" and ev.text.startswith("And then")):
                pass
        await asyncio.sleep(0.4)  # the safe reply (~0.25 s) has played; the long sentence is under way
        assert core.interrupt()
        heard = core.history()[-1]
    finally:
        await core.close()
    assert heard.role == "assistant" and heard.interrupted and turn == 1
    assert heard.content.startswith("Let's talk about art.") and "Banana" not in heard.content


async def test_a_new_personas_replies_take_over(tmp_path: Path):
    tts = CountingTTS()
    mod = Moderator(ModerationConfig(blocked_words=["banana"]))
    config = load_config(env={"VOICE_ACTORS__SESSION__HISTORY_DB": ""})
    core = SessionCore("sess-persona", config, vad=build_vad(config), stt=SilentSTT(), llm=ScriptLLM([]), tts=tts)
    child = TTSChild(core, tts, config.tts, moderator=mod)
    quick = QuickReplies(["Welcome to the gallery!"], QuickReplyCache(tmp_path))
    child.set_replies(quick, "换个话题吧。")
    assert child._safe_reply == "换个话题吧。" and quick.match("换个话题吧") == "换个话题吧。"
    assert quick.match("welcome to the gallery") == "Welcome to the gallery!"


def test_streaming_filters_hold_back_little_and_never_raise():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    pieces = st.sampled_from(list("ab 12.-*_#|`~[]()<>:!\n😊你好") + ["[happy]", "(laughing)", "```", "https://x.y"])
    chunk = st.lists(pieces, max_size=12).map("".join)

    @settings(max_examples=300, deadline=None)
    @given(st.lists(chunk, max_size=20))
    def check(chunks: list[str]) -> None:
        emotions, lines = EmotionFilter(), MarkdownLines()
        for c in chunks:
            shown, _ = emotions.feed(c)
            lines.feed(shown)
            assert len(emotions._held) <= 40
            assert len(lines._buf) <= 2000 + 30
        lines.feed(emotions.flush()[0])
        speakable(lines.flush())
        speakable("".join(chunks))

    check()
    lines = MarkdownLines()
    assert lines.feed("- " * 100)  # a marker-like start is not held forever

