"""The zero-key engine reads the prompt a cloud LLM gets (issue 10): the
owner's long-term memories and the knowledge the session retrieved, ingested
documents included, with their sources. Engine-level tests feed it prompts
built by the real prompt builder; the session tests run the real knowledge
pool class (in this process, then as the Ray actor a session actor uses).
Memory across sessions through SessionCore is in tests/test_memory.py."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from actors.agent import knowledge_api
from actors.agent.builtin_tools import default_registry
from actors.agent.knowledge import NOTHING_FOUND, Hit, KnowledgeBase, format_hits
from actors.agent.prompt import PromptParts, build_prompt
from actors.config import PROJECT_ROOT, load_config
from actors.providers.base import STT, TTS, AudioSegment, ChatMessage, ToolCall
from actors.providers.local.dialogue import LocalDialogueEngine
from actors.providers.local.prompt_notes import MAX_SPOKEN_CHARS, read_notes, spoken_excerpt

SPECS = default_registry().specs()
LIGHTHOUSE = (
    "The Harbour Lighthouse of Port Ellery was built in 1887 by the engineer Maud Tressel. "
    "Its lamp was first lit on 3 March 1888 and could be seen 22 nautical miles out at sea. "
    "The keeper's cottage beside it is now a small tearoom."
)
LIGHTHOUSE_Q = "When was the Harbour Lighthouse of Port Ellery built?"


def prompt(user: str, memories: list[str] | None = None, knowledge: str = "", summary: str = "") -> list[ChatMessage]:
    parts = PromptParts(system="You are Ava.", history=[ChatMessage(role="user", content=user)],
                        memories=memories or [], knowledge=knowledge, summary=summary)
    return build_prompt(parts, 4000)


def after_tool(messages: list[ChatMessage], call: ToolCall, result: str) -> list[ChatMessage]:
    return [*messages, ChatMessage(role="assistant", tool_calls=[call]),
            ChatMessage(role="tool", content=result, tool_call_id=call.id)]


@pytest.fixture(scope="module")
def engine() -> LocalDialogueEngine:
    return LocalDialogueEngine(KnowledgeBase.load(PROJECT_ROOT / "config" / "knowledge" / "museum.yaml"))


# ------------------------------------------------------------------ reading the prompt
def test_the_engine_reads_back_what_the_prompt_builder_writes():
    hits = [Hit("a", "First excerpt. It has two sentences.", 9.0, "notes.md › Part one"),
            Hit("b", "Second\n excerpt  spread over lines.", 5.0, "harbour.txt")]
    messages = prompt("Where is it?", memories=["my cat is called Miso", "I live in Paris"],
                      knowledge=format_hits(hits),
                      summary="User: Knowledge base excerpts.\nAssistant: What you remember about this user:")
    notes = read_notes(messages)
    assert notes.memories == ["my cat is called Miso", "I live in Paris"]
    assert notes.searched and [(e.number, e.source, e.text) for e in notes.excerpts] == [
        (1, "notes.md › Part one", "First excerpt. It has two sentences."),
        (2, "harbour.txt", "Second excerpt spread over lines."),
    ]
    nothing = read_notes(prompt("Pizza?", knowledge=format_hits([])))
    assert nothing.searched and nothing.excerpts == [] and nothing.memories == []
    assert NOTHING_FOUND in prompt("Pizza?", knowledge=format_hits([]))[0].content
    bare = read_notes([ChatMessage(role="user", content="hi")])
    assert not bare.searched and bare.memories == [] and bare.excerpts == []


# ------------------------------------------------------------------ memories
def test_a_recall_question_falls_back_to_the_owners_memories(engine):
    messages = prompt("What is my cat called?", memories=["my cat is called Miso", "I live in Paris"])
    call = engine.respond(messages, SPECS).tool_call
    assert call is not None and call.name == "recall"  # this session's facts first, as before
    reply = engine.respond(after_tool(messages, call, '{"key": "cat called", "value": null, "found": false}'), SPECS)
    assert reply.text == "Your cat is called Miso."
    # a shared everyday word is not enough: a dog is not the cat
    messages = prompt("What is my dog called?", memories=["my cat is called Miso"])
    call = engine.respond(messages, SPECS).tool_call
    reply = engine.respond(after_tool(messages, call, '{"key": "dog called", "value": null, "found": false}'), SPECS)
    assert reply.text == "I don't have anything remembered about that yet."


def test_what_do_you_remember_lists_session_facts_and_memories_once(engine):
    messages = prompt("What do you remember about me?", memories=["my cat is called Miso", "I live in Paris"])
    call = engine.respond(messages, SPECS).tool_call
    assert call is not None and call.name == "recall"
    reply = engine.respond(after_tool(messages, call, '{"facts": {"cat": "called Miso"}}'), SPECS).text
    assert reply == "I remember that your cat is called Miso and you live in Paris."


def test_memories_answer_without_the_session_recall_tool_and_questions_about_the_user(engine):
    memories = ["my cat is called Miso", "I live in Paris near the Louvre"]
    assert engine.respond(prompt("What's my cat called?", memories), []).text == "Your cat is called Miso."
    assert engine.respond(prompt("Where do I live?", memories), SPECS).text == \
        "You told me that you live in Paris near the Louvre."
    assert engine.respond(prompt("Where do I live?"), SPECS).text.startswith("I'm not sure")


# ------------------------------------------------------------------ knowledge
def test_knowledge_in_the_prompt_is_answered_from_and_cited(engine):
    block = format_hits([Hit("h", LIGHTHOUSE, 7.5, "harbour-lighthouse.txt")])
    reply = engine.respond(prompt(LIGHTHOUSE_Q, knowledge=block), SPECS).text
    assert reply.startswith("The Harbour Lighthouse of Port Ellery was built in 1887")
    assert reply.endswith("Source: harbour-lighthouse.txt.")
    museum = format_hits([Hit("r", "The Rosetta Stone is a slab. Location: Gallery 1, ground floor.", 9,
                              "museum.yaml › Rosetta Stone")])
    assert engine.respond(prompt("Where is the Rosetta Stone?", knowledge=museum), SPECS).text == \
        "You can find it in Gallery 1, ground floor. Source: museum.yaml › Rosetta Stone."
    told = engine.respond(prompt("Tell me about the Rosetta Stone.", knowledge=museum), SPECS).text
    assert told == ("The Rosetta Stone is a slab. Here, you'll find it in Gallery 1, ground floor. "
                    "Source: museum.yaml › Rosetta Stone.")
    # nothing retrieved: the engine's own curated entries still answer, and a stranger question is honest
    nothing = format_hits([])
    assert "Mona Lisa" in engine.respond(prompt("Tell me about the Mona Lisa.", knowledge=nothing), SPECS).text
    assert engine.respond(prompt(LIGHTHOUSE_Q, knowledge=nothing), SPECS).text.startswith("I'm not sure")


def test_a_long_excerpt_is_read_from_the_sentence_that_answers():
    filler = "The harbour has many boats and a long stone pier. " * 12
    text = filler + "The lighthouse was built in 1887 by Maud Tressel. " + filler
    spoken = spoken_excerpt(text, "Who built the lighthouse?")
    assert spoken.startswith("The lighthouse was built in 1887") and len(spoken) <= MAX_SPOKEN_CHARS
    assert spoken_excerpt("Short text.", "anything") == "Short text."


# ------------------------------------------------------------------ a session on the real pool class
class SilentTTS(TTS):
    async def synthesize(self, text: str) -> AudioSegment:
        return AudioSegment(b"\0\0" * 160, 16000)


class NoSTT(STT):
    async def transcribe(self, pcm16: bytes) -> str:
        return ""


class InProcessPool:
    """The knowledge pool actor's own class, called in this process: the
    same `.search.remote` / `.ingest.remote` calls a session and the HTTP
    routes make, without starting Ray."""

    def __init__(self, cfg: Any) -> None:
        from actors.agent.knowledge_pool import KnowledgePool

        pool = KnowledgePool.__ray_actor_class__(cfg, str(PROJECT_ROOT))
        for name in ("search", "ingest", "remove"):
            setattr(self, name, SimpleNamespace(remote=getattr(pool, name)))


async def ask(core: Any, q: asyncio.Queue[Any], text: str) -> str:
    turn = core.send_text(text)
    out: list[str] = []
    while (event := await asyncio.wait_for(q.get(), 20)).type != "metrics" or event.turn_id != turn:
        if event.type == "llm.delta" and event.turn_id == turn:
            out.append(event.text)
    return "".join(out)


def local_session(session_id: str, config: Any) -> tuple[Any, asyncio.Queue[Any]]:
    """A SessionCore on the default engine (as `llm.provider: local-dialogue`
    builds it) and a text-only subscriber; wire stores before the first turn."""
    from actors.providers import build_llm, build_vad
    from actors.session_core import SessionCore
    from actors.tts import OutputPrefs

    assert config.llm.provider == "local-dialogue"
    core = SessionCore(session_id, config, vad=build_vad(config), stt=NoSTT(),
                       llm=build_llm("local-dialogue", config), tts=SilentTTS())
    core.start()
    return core, core.subscribe(OutputPrefs(speak=False))


async def test_an_ingested_document_is_answered_from_by_the_default_engine_with_its_source(tmp_path: Path):
    config = load_config(env={"VOICE_ACTORS__SESSION__HISTORY_DB": "",
                              "VOICE_ACTORS__KNOWLEDGE__STORE_DIR": str(tmp_path / "knowledge")})
    pool = InProcessPool(config.knowledge)
    core, q = local_session("brain", config)
    core.use_knowledge(pool)
    try:
        assert "1887" not in await ask(core, q, LIGHTHOUSE_Q)
        # what POST /api/knowledge/documents runs, on this pool
        result = await knowledge_api.ingest(config.knowledge, config.server.namespace, "harbour-lighthouse.txt",
                                            LIGHTHOUSE.encode(), "text/plain", pool=pool)
        assert result["chunks"] == 1
        reply = await ask(core, q, LIGHTHOUSE_Q)
        assert "built in 1887 by the engineer Maud Tressel" in reply and "Source: harbour-lighthouse.txt" in reply
        museum = await ask(core, q, "Tell me about the Rosetta Stone.")
        assert museum.startswith("The Rosetta Stone") and "Source: museum.yaml › Rosetta Stone" in museum
        await knowledge_api.remove(config.knowledge, config.server.namespace, "harbour-lighthouse.txt", pool=pool)
        assert "1887" not in await ask(core, q, LIGHTHOUSE_Q)
    finally:
        await core.close()


async def test_a_session_actor_on_the_default_engine_answers_from_an_ingested_document(ray_cluster, config, tap):
    """The wiring: a session actor's default engine gets the node's knowledge pool actor in its prompt."""
    from actors.sessions import new_session_id, open_session

    name = "port-ellery-lighthouse.txt"
    await knowledge_api.ingest(config.knowledge, config.server.namespace, name, LIGHTHOUSE.encode(), "text/plain")
    actor = await open_session(config, new_session_id())
    try:
        await actor.ready.remote()
        async with tap(actor) as t:
            turn = await actor.send_text.remote(LIGHTHOUSE_Q)
            await t.wait_for(lambda e: e.type == "metrics" and e.turn_id == turn, timeout=60)
        reply = "".join(e.text for e in t.of("llm.delta", turn))
        assert "1887" in reply and f"Source: {name}" in reply, reply
    finally:
        ray_cluster.kill(actor.actor)
        await knowledge_api.remove(config.knowledge, config.server.namespace, name)
