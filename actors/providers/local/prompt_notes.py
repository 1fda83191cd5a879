"""What the offline engine reads in its prompt: the user's long-term memories
and the knowledge the session retrieved, and how it answers from them.

A cloud LLM learns both from the system message that agent/prompt.py builds
("What you remember about this user:" lines, then the numbered knowledge
excerpts of `format_hits`). The offline engine reads the same message rather
than a store of its own, so a fact told in an earlier session, or a document
an admin ingested over HTTP, reaches it through the same path, under the
same rules: the persona's memory policy and knowledge switch, the memory
owner, the pool's relevance threshold and its token budget. Reading the
prompt rather than calling `recall_memory` / `search_knowledge` also works
for personas that list neither tool, and costs no extra tool round.

The formats are parsed here and written there; tests/test_local_brain.py
reads back what `build_prompt` and `format_hits` write, so a change on one
side that the other misses fails a test rather than a conversation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from actors.agent.bm25 import tokenize
from actors.agent.knowledge import NOTHING_FOUND
from actors.providers.base import ChatMessage
from actors.providers.local.phrasing import as_sentence, second_person

MEMORY_HEADING = "What you remember about this user:"
"""How build_prompt introduces the memory lines (one `- fact` each)."""
KNOWLEDGE_HEADING = "Knowledge base excerpts."
"""How format_hits starts a block of hits; NOTHING_FOUND when none passed."""
MAX_SPOKEN_CHARS = 600
"""A longer excerpt is not read whole: its sentences nearest the question are."""
_WEAK = frozenset({"call", "called", "name", "named", "favourite", "favorite", "like", "love"})
"""Words too common in facts about oneself to tie a question to a memory on their own
("what is my dog called" must not get "my cat is called Miso")."""
_FIRST_PERSON = re.compile(r"\b(?:i|i'm|i've|my|mine|myself)\b", re.I)
_LOCATION = re.compile(r"\s*Location: (?P<where>[^.]+)\.?\s*$")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class Excerpt:
    """One numbered knowledge hit as the prompt shows it."""

    number: int
    source: str
    text: str


@dataclass
class PromptNotes:
    memories: list[str] = field(default_factory=list)
    """The owner's memories the store recalled for this turn, best first."""
    excerpts: list[Excerpt] = field(default_factory=list)
    """Knowledge hits, best first."""
    searched: bool = False
    """The session retrieved knowledge for this turn (hits or the nothing-found notice)."""


def read_notes(messages: list[ChatMessage]) -> PromptNotes:
    """The memories and knowledge in the prompt's system message; empty when
    there is none (a bare engine, or a session without a store or a pool)."""
    system = next((m.content for m in messages if m.role == "system"), "")
    notes = PromptNotes()
    if not system:
        return notes
    start = system.find(MEMORY_HEADING + "\n")
    if start >= 0:
        for line in system[start + len(MEMORY_HEADING) + 1:].split("\n"):
            if not line.startswith("- "):
                break
            if line[2:].strip():
                notes.memories.append(line[2:].strip())
    # The knowledge block is the last part of the system message, and its
    # excerpts have no line breaks inside, so the last heading is the real one.
    head = system.rfind("\n\n" + KNOWLEDGE_HEADING)
    if head >= 0:
        notes.searched = True
        for block in system[head + 2:].split("\n\n")[1:]:
            m = re.match(r"\[(\d+)\] ([^\n]+)\n(.+)", block, re.S)
            if m and m.group(3).strip():
                notes.excerpts.append(Excerpt(int(m.group(1)), m.group(2).strip(), " ".join(m.group(3).split())))
    elif system.endswith(NOTHING_FOUND):
        notes.searched = True
    return notes


# ------------------------------------------------------------------ memories
def relevant_memories(query: str, memories: list[str]) -> list[str]:
    """The memory lines that share a telling word with `query` (a fact's key
    such as "cat called", or a whole question), most shared words first,
    the store's order otherwise."""
    wanted = set(tokenize(query))
    strong = wanted - _WEAK
    scored: list[tuple[int, int, str]] = []
    for i, line in enumerate(memories):
        words = set(tokenize(line))
        if strong and not strong & words:
            continue
        shared = len(wanted & words)
        if shared:
            scored.append((-shared, i, line))
    return [line for _, _, line in sorted(scored)]


def is_about_the_user(text: str) -> bool:
    """A question in the first person ("where do I live"), which a memory may answer."""
    return _FIRST_PERSON.search(text) is not None


def told_you(line: str) -> str:
    """A memory in the user's words, said back to them: 'my cat is called
    Miso' → 'Your cat is called Miso.'"""
    return as_sentence(second_person(line))


# ----------------------------------------------------------------- knowledge
def location_of(excerpt: Excerpt) -> tuple[str, str | None]:
    """(text, location) of an excerpt: a museum entry's chunk ends with
    'Location: <where>.' (documents.chunks_from_entries)."""
    m = _LOCATION.search(excerpt.text)
    if m is None:
        return excerpt.text, None
    return excerpt.text[:m.start()].strip(), m.group("where").strip()


def spoken_excerpt(text: str, query: str) -> str:
    """The excerpt to read aloud: whole when short; otherwise the sentence
    sharing most words with the question and those after it, up to
    MAX_SPOKEN_CHARS (a chunk may be 800 characters about several things)."""
    text = text.rstrip("…").strip()
    if len(text) <= MAX_SPOKEN_CHARS:
        return text
    sentences = [s for s in _SENTENCE_END.split(text) if s.strip()]
    wanted = set(tokenize(query))
    best = max(range(len(sentences)), key=lambda i: (len(wanted & set(tokenize(sentences[i]))), -i))
    out: list[str] = []
    for sentence in sentences[best:]:
        if out and len(" ".join([*out, sentence])) > MAX_SPOKEN_CHARS:
            break
        out.append(sentence)
    return " ".join(out)[:MAX_SPOKEN_CHARS]


def knowledge_answer(excerpt: Excerpt, query: str, where_question: bool) -> str:
    """An answer from the best excerpt, citing its source as the prompt
    names it (the same label `/api/knowledge/search` shows)."""
    text, where = location_of(excerpt)
    cite = f" Source: {excerpt.source}."
    if where and where_question:
        return f"You can find it in {where}.{cite}"
    located = f" Here, you'll find it in {where}." if where else ""
    return as_sentence(spoken_excerpt(text, query)) + located + cite
