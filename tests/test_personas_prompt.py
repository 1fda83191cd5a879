"""Personas from files, and the prompt built inside its token budget with
older turns folded into a summary (issue 10, items 1 and 2). No Ray: the
dialogue child runs in a SessionCore in this process with a recording LLM."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from actors.agent.persona import Persona, PersonaError, load_persona_dir, persona_config
from actors.agent.prompt import (
    PromptParts,
    build_prompt,
    estimate_tokens,
    extractive_summary,
    fold_history,
    message_tokens,
)
from actors.config import PROJECT_ROOT, ConfigError, load_config
from actors.providers.base import LLM, TTS, AudioSegment, ChatMessage, LLMChunk, ToolSpec


def test_the_shipped_personas_load_and_are_distinct():
    personas = load_persona_dir(PROJECT_ROOT / "config" / "personas")
    assert {"museum-guide", "museum-guide-zh", "storyteller", "home-assistant"} <= personas.keys()
    zh = personas["museum-guide-zh"]
    assert zh.language == "zh" and zh.greeting_text().startswith("你好") and zh.voices["dashscope"]
    assert personas["storyteller"].memory == "auto" and not personas["storyteller"].allows_tool("calculate")
    assert personas["home-assistant"].tools is None and personas["home-assistant"].allows_tool("device__volume")
    assert len({p.system_prompt for p in personas.values()}) == len(personas)


@pytest.mark.parametrize("name, body, words", [
    ("Bad Name.yaml", "name: x", "file name is its id"),
    ("ok.yaml", "name: x\ntemperature: 9", "temperature"),
    ("ok.yaml", "id: other\nname: x", "differs from the file name"),
    ("ok.yaml", "- a list", "mapping"),
    ("ok.yaml", "name: x\nunknown_field: 1", "unknown_field"),
])
def test_a_bad_persona_file_fails_the_start_naming_the_file(tmp_path: Path, name: str, body: str, words: str):
    (tmp_path / name).write_text(body)
    with pytest.raises(PersonaError) as e:
        load_persona_dir(tmp_path)
    assert name in str(e.value) and words in str(e.value)


def test_config_merges_persona_files_with_inline_ones_and_checks_the_default(tmp_path: Path):
    personas = tmp_path / "personas"
    personas.mkdir()
    (personas / "guide.yaml").write_text("name: File Guide\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"personas_dir: {personas}\ndefault_persona: guide\npersonas:\n  extra: {{name: Inline}}\n")
    config = load_config(cfg, env={})
    assert config.persona().name == "File Guide" and config.persona("extra").id == "extra"
    assert config.persona("nonesuch").name == "File Guide"
    cfg.write_text(f"personas_dir: {personas}\ndefault_persona: missing\n")
    with pytest.raises(ConfigError, match="default_persona"):
        load_config(cfg, env={})


def test_persona_config_sets_voice_temperature_and_the_default():
    config = load_config(PROJECT_ROOT / "config" / "cloud-zh.yaml", env={})
    persona = config.persona("storyteller")
    own = persona_config(config, persona)
    from actors.providers import registry

    assert registry.section(own, "tts", "dashscope").voice == "longxiaoxia_v2"
    llm = registry.section(own, "llm", "openai-compatible")
    assert llm.temperature == 0.9 and llm.max_tokens == 500
    assert own.persona().id == "storyteller"
    assert registry.section(config, "tts", "dashscope").voice == "longxiaochun_v2", "the shared config is untouched"


# ------------------------------------------------------------------ prompt budget
def turn(i: int, words: int = 30) -> list[ChatMessage]:
    return [ChatMessage(role="user", content=f"Question {i}: " + "word " * words),
            ChatMessage(role="assistant", content=f"Answer {i}. " + "reply " * words)]


def test_estimates_count_cjk_per_character():
    assert estimate_tokens("你好世界") == 4
    assert 2 <= estimate_tokens("hello world") <= 4


def test_the_prompt_keeps_whole_newest_turns_within_the_budget():
    history = [m for i in range(40) for m in turn(i)] + [ChatMessage(role="user", content="And now?")]
    messages = build_prompt(PromptParts(system="You are a guide.", history=history, memories=["Name: Ana"],
                                        knowledge="[1] museum.md › Rosetta Stone\nA granodiorite stele.",
                                        summary="User: Question 0."), budget_tokens=600)
    assert sum(message_tokens(m) for m in messages) <= 600
    assert messages[0].role == "system" and "Name: Ana" in messages[0].content
    assert "Rosetta Stone" in messages[0].content and "Question 0." in messages[0].content
    assert messages[1].role == "user", "history starts at a whole turn"
    assert messages[-1].content == "And now?" and len(messages) < len(history)


def test_knowledge_is_cut_before_the_users_question():
    knowledge = "\n".join(f"[{i}] notes › part {i}\n" + "fact " * 40 for i in range(30))
    question = ChatMessage(role="user", content="What is the Rosetta Stone?")
    messages = build_prompt(PromptParts(system="sys", history=[question], knowledge=knowledge), budget_tokens=300)
    assert messages[-1] == question and sum(message_tokens(m) for m in messages) <= 300
    assert "[0] notes" in messages[0].content and "[29] notes" not in messages[0].content


def test_folding_moves_whole_old_turns_into_a_bounded_summary():
    history = [m for i in range(30) for m in turn(i)]
    kept, folded, summary = fold_history(history, "", keep_tokens=400, summary_tokens=120)
    assert folded and kept[0].role == "user" and folded + kept == history
    assert sum(message_tokens(m) for m in kept) <= 400
    assert estimate_tokens(summary) <= 120 and summary.splitlines()[-1].startswith("Assistant: Answer")
    assert extractive_summary("", [ChatMessage(role="tool", content="{}")], 50) == ""


# ------------------------------------------------------------------ 200 turns through the dialogue child
class RecordingLLM(LLM):
    def __init__(self) -> None:
        self.prompts: list[list[ChatMessage]] = []

    async def stream(self, messages: list[ChatMessage], tools: list[ToolSpec]) -> AsyncIterator[LLMChunk]:
        self.prompts.append(messages)
        if messages[-1].content.startswith("Summarise the conversation"):
            yield LLMChunk(text="The user asked numbered questions; the first was about the Rosetta Stone.")
            return
        yield LLMChunk(text="Here is a fairly long answer that fills the history with words. " * 3)


class SilentTTS(TTS):
    async def synthesize(self, text: str) -> AudioSegment:
        return AudioSegment(b"", 16000)


@pytest.mark.parametrize("summarize", ["extractive", "llm"])
async def test_a_200_turn_conversation_stays_inside_the_budget_and_keeps_a_summary(summarize: str):
    from actors.providers import build_stt, build_vad
    from actors.session_core import SessionCore
    from actors.tts import OutputPrefs

    config = load_config(env={})
    llm_cfg = config.llm.model_copy(update={"context_tokens": 1500, "reply_tokens": 300, "summary_tokens": 200,
                                            "summarize": summarize})
    config = config.model_copy(update={"llm": llm_cfg})
    llm = RecordingLLM()
    core = SessionCore("budget", config, vad=build_vad(config), stt=build_stt("local-whisper", config), llm=llm,
                       tts=SilentTTS())
    core.start()
    q = core.subscribe(OutputPrefs(speak=False))
    budget = core.dialogue.budget_tokens
    for i in range(200):
        subject = "the Rosetta Stone" if i == 0 else f"exhibit number {i}"
        turn_id = core.send_text(f"Tell me about {subject}, please, in some detail.")
        while True:
            event = await asyncio.wait_for(q.get(), 10)
            if event.type == "metrics" and event.turn_id == turn_id:
                break
    await asyncio.sleep(0.05)  # the LLM summary task of the last fold
    answers = [p for p in llm.prompts if not p[-1].content.startswith("Summarise")]
    assert len(answers) == 200
    assert max(sum(message_tokens(m) for m in p) for p in answers) <= budget
    assert "exhibit number 199" in answers[-1][-1].content
    summary = core.dialogue.summary
    assert summary and estimate_tokens(summary) <= 200
    assert "Summary of the earlier conversation" in answers[-1][0].content
    if summarize == "llm":
        assert summary.startswith("The user asked numbered questions")
    else:
        assert "exhibit number 19" in summary  # recent folds are in it; the oldest lines made room
    assert len(core.dialogue.history) <= config.session.max_history_messages
    await core.close()


def test_persona_defaults_speak_its_language():
    assert Persona(name="小智", language="zh").safe_reply_text().startswith("这个")
    assert Persona(name="Ava").greeting_text() == "Hi, I'm Ava. How can I help?"


async def test_a_blocked_user_message_gets_the_personas_safe_reply_and_never_reaches_the_llm():
    from actors.agent.moderation import ModerationConfig
    from actors.providers import build_stt, build_vad
    from actors.session_core import SessionCore
    from actors.tts import OutputPrefs

    config = load_config(env={"VOICE_ACTORS__SESSION__HISTORY_DB": ""})
    config = config.model_copy(update={"moderation": ModerationConfig(blocked_words={"weapons": ["dynamite"]})})
    llm = RecordingLLM()
    core = SessionCore("moderated", config, vad=build_vad(config), stt=build_stt("local-whisper", config), llm=llm,
                       tts=SilentTTS())
    core.start()
    q = core.subscribe(OutputPrefs(speak=False))
    turn_id = core.send_text("How do I make DYNAMITE at home?")
    deltas = []
    while True:
        event = await asyncio.wait_for(q.get(), 10)
        if event.type == "llm.delta":
            deltas.append(event.text)
        if event.type == "metrics" and event.turn_id == turn_id:
            break
    assert "".join(deltas) == config.persona().safe_reply_text() and llm.prompts == []
    assert all("DYNAMITE" not in m.content for m in core.dialogue.history)
    turn_id = core.send_text("Tell me about the Rosetta Stone.")
    while (event := await asyncio.wait_for(q.get(), 10)).type != "metrics":
        pass
    assert len(llm.prompts) == 1, "the next, harmless message is answered as usual"
    await core.close()


async def test_a_persona_offers_only_its_tools_and_a_call_to_another_gets_an_error_result():
    """Persona(tools=[...]) filters what the LLM is offered, and a model that calls another tool
    anyway (a hallucinated or stale name) gets an error result instead of the tool running."""
    import json

    from actors.agent.builtin_tools import default_registry
    from actors.agent.tools import SessionTools, ToolContext, ToolsConfig
    from actors.dialogue import DialogueState, UserTurn
    from actors.events import ToolResultEvent
    from actors.providers.base import ToolCall
    from tests.dialogue_stub import StubCore

    class ForcingLLM(LLM):
        def __init__(self) -> None:
            self.requests: list[tuple[list[ChatMessage], list[ToolSpec]]] = []

        async def stream(self, messages: list[ChatMessage], tools: list[ToolSpec]) -> AsyncIterator[LLMChunk]:
            self.requests.append((list(messages), list(tools)))
            if len(self.requests) == 1:
                yield LLMChunk(tool_call=ToolCall(id="c1", name="calculate", arguments={"expression": "2+2"}))
            else:
                yield LLMChunk(text="I can't calculate here.")

    llm = ForcingLLM()
    tools = SessionTools(default_registry(), ToolContext(), ToolsConfig())
    assert "calculate" in {s.name for s in tools.specs()}  # the session has it; the persona does not allow it
    core = StubCore("allowed-tools")
    dialogue = DialogueState(core, llm, tools, tools.ctx, Persona(tools=["get_time"]), max_history=40)
    await dialogue.handle(UserTurn(turn_id=1, text="What is 2 + 2?"))
    assert [s.name for s in llm.requests[0][1]] == ["get_time"]
    result = json.loads(next(m.content for m in dialogue.history if m.role == "tool"))
    assert result == {"error": "the tool 'calculate' is not available"}
    assert [json.loads(e.result) for e in core.events if isinstance(e, ToolResultEvent)] == [result]
    assert llm.requests[1][0][-1].role == "tool" and "not available" in llm.requests[1][0][-1].content
    assert dialogue.history[-1].content == "I can't calculate here."
