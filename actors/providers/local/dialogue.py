"""The offline default "LLM": intent rules, retrieval and the built-in tools.

No instruction-tuned model ships on PyPI (DESIGN §4), so a fresh clone talks
through this engine instead. It is honest about what it is (see `label`), and
it speaks the same protocol as a real model: it streams text word by word and
asks for tools with `LLMChunk(tool_call=...)` rather than running them, so the
dialogue's tool loop, interruption and TTS sentence splitting are exercised
exactly as they will be with a cloud LLM. It also reads the prompt a cloud
LLM gets (prompt_notes.py): the owner's long-term memories answer "what is
my cat called?" across sessions, and the knowledge the session retrieved
(ingested documents included) answers a question, its source cited; the
engine's own curated knowledge base answers only when nothing was retrieved.

Input is a Whisper transcript: capitals, punctuation, numbers as digits or
words. Rules match on normalised lower-case text; values the user dictates
(a name, a fact) keep the user's spelling.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from actors.agent.knowledge import KnowledgeBase
from actors.providers.base import LLM, ChatMessage, LLMChunk, ToolCall, ToolSpec
from actors.providers.local.intents import (
    GREETING,
    PATTERNS,
    clean,
    fact_phrase,
    find_expression,
    name_from,
    parse_timer,
)
from actors.providers.local.phrasing import (
    as_sentence,
    format_duration,
    format_number,
    join_words,
    second_person,
    speak_expression,
)
from actors.providers.local.prompt_notes import (
    PromptNotes,
    is_about_the_user,
    knowledge_answer,
    read_notes,
    relevant_memories,
    told_you,
)


@dataclass
class Reply:
    """What one turn produces: text to stream, or one tool call to request."""

    text: str = ""
    tool_call: ToolCall | None = None
    emotion: str | None = None


_CAN_T = {
    "get_time": "check the time",
    "get_date": "check the date",
    "calculate": "do arithmetic",
    "set_timer": "set timers",
    "remember": "remember things",
    "recall": "look up what you asked me to remember",
}
_COULDNT = {
    "get_time": "check the time",
    "get_date": "check the date",
    "calculate": "work that out",
    "set_timer": "set that timer",
    "remember": "remember that",
    "recall": "look that up",
}


class LocalDialogueEngine(LLM):
    """Rules first, then retrieval, then an honest fallback; see module doc."""

    label = "local dialogue engine (intent rules + retrieval; not an LLM)"

    def __init__(
        self,
        knowledge: KnowledgeBase | None,
        persona_name: str = "Ava",
        chunk_delay_s: float = 0.0,
        min_score: float = 3.0,
    ) -> None:
        self.knowledge = knowledge
        self.persona_name = persona_name
        self.chunk_delay_s = chunk_delay_s
        self.min_score = min_score
        """Below this BM25 score a match is a coincidence ('world famous' for
        'world cup'); tuned on museum.yaml, where real hits score above 3.9."""

    # ------------------------------------------------------------ stream
    async def stream(self, messages: list[ChatMessage], tools: list[ToolSpec]) -> AsyncIterator[LLMChunk]:
        reply = self.respond(messages, tools)
        if reply.emotion:
            yield LLMChunk(emotion=reply.emotion)
        if reply.tool_call is not None:
            yield LLMChunk(tool_call=reply.tool_call)
            return
        for i, chunk in enumerate(re.findall(r"\S+\s*", reply.text)):
            if i:
                # Yield to the loop even at zero delay, so an interruption
                # can cancel the stream between words as with a real model.
                await asyncio.sleep(self.chunk_delay_s)
            yield LLMChunk(text=chunk)

    def respond(self, messages: list[ChatMessage], tools: list[ToolSpec]) -> Reply:
        """The whole decision for one turn, synchronous and side-effect free."""
        if not messages:
            return Reply()
        last = messages[-1]
        notes = read_notes(messages)  # the memories and knowledge the session put in the prompt
        if last.role == "tool":
            return self._after_tools(messages, notes)
        if last.role != "user":
            return Reply()
        return self._answer(last.content, {t.name for t in tools}, f"call_{len(messages)}", notes)

    # --------------------------------------------------------- tool results
    def _after_tools(self, messages: list[ChatMessage], notes: PromptNotes) -> Reply:
        results: list[ChatMessage] = []
        for msg in reversed(messages):
            if msg.role != "tool":
                break
            results.insert(0, msg)
        calls = {c.id: c for m in messages if m.role == "assistant" for c in m.tool_calls}
        sentences = [self._speak_result(calls.get(r.tool_call_id or ""), r.content, notes) for r in results]
        return Reply(text=" ".join(s for s in sentences if s))

    def _speak_result(self, call: ToolCall | None, content: str, notes: PromptNotes) -> str:
        name = call.name if call else ""
        try:
            data: Any = json.loads(content)
        except (TypeError, ValueError):
            data = None
        if not isinstance(data, dict):
            return "Done."
        if "error" in data:
            return as_sentence(f"Sorry, I couldn't {_COULDNT.get(name, 'do that')}: {data['error']}")
        if name == "get_time" and "spoken" in data:
            return f"It is {data['spoken']}."
        if name == "get_date" and "spoken" in data:
            return f"Today is {data['spoken']}."
        if name == "calculate" and "result" in data:
            spoken = speak_expression(str(data.get("expression", "")))
            result = format_number(data["result"])
            return as_sentence(f"{spoken} is {result}" if spoken else f"the answer is {result}")
        if name == "set_timer" and "seconds" in data:
            label = f", labelled {data['label']}" if data.get("label") else ""
            return f"Okay, I set a timer for {format_duration(float(data['seconds']))}{label}."
        if name == "end_conversation":
            return "Goodbye, and have a lovely day!"
        if name == "set_reminder" and "message" in data:
            return as_sentence(f"Okay, I will remind you to {data['message']}") if "in_seconds" in data else "Done."
        if name == "remember" and "key" in data:
            return f"Got it, I will remember that {fact_phrase(data['key'], data['value'])}."
        if name == "recall":
            return self._recalled(data, notes)
        return as_sentence(str(data["spoken"])) if isinstance(data.get("spoken"), str) else "Done."

    @staticmethod
    def _recalled(data: dict[str, Any], notes: PromptNotes) -> str:
        """This session's facts (the `recall` tool), else the long-term
        memories of earlier sessions that the prompt carries."""
        if "facts" in data:
            facts = [fact_phrase(k, v) for k, v in data["facts"].items()]
            said = {f.lower() for f in facts}
            facts += [f for f in (second_person(m) for m in notes.memories) if f.lower() not in said]
            if not facts:
                return "I don't have anything remembered yet."
            return as_sentence(f"I remember that {join_words(facts)}")
        if data.get("found"):
            return as_sentence(fact_phrase(data["key"], data["value"]))
        memories = relevant_memories(str(data.get("key") or ""), notes.memories)
        if memories:
            return told_you(memories[0])
        return "I don't have anything remembered about that yet."

    # ------------------------------------------------------------ user turn
    def _answer(self, raw: str, tool_names: set[str], call_id: str, notes: PromptNotes) -> Reply:
        text = clean(raw)
        greeting = re.match(
            rf"^{GREETING}(?:\s+(?:there|everyone|again|{re.escape(self.persona_name.lower())}))*\b[\s,.!]*",
            text,
            re.I,
        )
        if greeting:
            text = text[greeting.end():]
            if not text:
                return Reply(text=self._greeting(), emotion="happy")
        lower = text.lower()
        if not lower:
            return Reply(text="Sorry, I didn't catch that. Could you say it again?")

        def call(name: str, **arguments: Any) -> Reply:
            if name not in tool_names:
                return Reply(text=f"Sorry, I can't {_CAN_T.get(name, 'do that')} right now.")
            return Reply(tool_call=ToolCall(id=f"{call_id}_{name}", name=name, arguments=arguments))

        # Statements about the user first: "Hi, my name is Ana" is not a greeting.
        m = PATTERNS["remember_name"].search(text)
        if m and (name := name_from(m.group("rest"))):
            return call("remember", key="name", value=name)
        m = PATTERNS["remember"].match(text)
        if m:
            fact = m.group("fact").strip()
            split = PATTERNS["fact_split"].match(fact)
            if split:
                return call("remember", key=split.group("key"), value=split.group("value").strip())
            spoken = second_person(fact)
            return call("remember", key=spoken, value=spoken)

        def recall(key: str | None = None) -> Reply:
            if "recall" not in tool_names and notes.memories:  # no session facts to look up: memories answer
                if key is None:
                    return Reply(text=self._recalled({"facts": {}}, notes))
                if found := relevant_memories(key, notes.memories):
                    return Reply(text=told_you(found[0]))
            return call("recall") if key is None else call("recall", key=key)

        if PATTERNS["recall_all"].search(lower):
            return recall()
        m = PATTERNS["recall_key"].match(lower) or PATTERNS["recall_what_my"].search(lower)
        if m:
            return recall(m.group("key"))
        if PATTERNS["who_am_i"].search(lower):
            return recall("name")

        if PATTERNS["timer"].search(lower):
            if PATTERNS["timer_cancel"].search(lower):
                return Reply(text="Sorry, I can only start new timers. I can't check or cancel them yet.")
            seconds, label = parse_timer(lower)
            if seconds is None:
                return Reply(text="How long should the timer be? For example, say set a timer for five minutes.")
            args: dict[str, Any] = {"seconds": int(seconds) if float(seconds).is_integer() else seconds}
            if label:
                args["label"] = label
            return call("set_timer", **args)

        expression = find_expression(lower)
        if expression:
            return call("calculate", expression=expression)
        if PATTERNS["time"].search(lower):
            return call("get_time")
        if PATTERNS["date"].search(lower):
            return call("get_date")

        if PATTERNS["help"].search(lower):
            return Reply(text=self._help(tool_names))
        if PATTERNS["how_are_you"].search(lower):
            return Reply(text="I'm doing well, thank you for asking. How can I help?", emotion="happy")
        if PATTERNS["thanks"].search(lower):
            return Reply(text="You're welcome! Is there anything else I can help with?", emotion="happy")
        if PATTERNS["bye"].search(lower):
            if "end_conversation" in tool_names:  # the session really ends once this goodbye is spoken
                return call("end_conversation")
            return Reply(text="Goodbye, and have a lovely day!", emotion="happy")
        if self.knowledge is not None and PATTERNS["list"].search(lower):
            titles = self.knowledge.titles()
            return Reply(text=f"You can see {len(titles)} exhibits: {join_words(titles)}. Ask me about any of them.")
        return self._retrieve(text, lower, tool_names, notes)

    def _retrieve(self, text: str, lower: str, tool_names: set[str], notes: PromptNotes) -> Reply:
        """The knowledge the session retrieved for this turn (as a cloud LLM
        gets it: ingested documents included, source cited), else this
        engine's own curated entries, else a memory that answers a question
        about the user, else an honest "not sure"."""
        if notes.excerpts:
            return Reply(text=knowledge_answer(notes.excerpts[0], text, PATTERNS["where"].search(lower) is not None))
        hits = self.knowledge.search(text, k=1) if self.knowledge is not None else []
        if hits and hits[0][1] >= self.min_score:
            entry = hits[0][0]
            if entry.location and PATTERNS["where"].search(lower):
                return Reply(text=f"You can find it in {entry.location}.")
            where = f" Here, you'll find it in {entry.location}." if entry.location else ""
            return Reply(text=as_sentence(entry.text) + where)
        if is_about_the_user(text) and (memories := relevant_memories(text, notes.memories)):
            return Reply(text=as_sentence(f"you told me that {second_person(memories[0])}"))
        return Reply(text=f"I'm not sure about that. {self._abilities(tool_names)}")

    # ------------------------------------------------------------- phrasing
    def _greeting(self) -> str:
        name = self.knowledge.name if self.knowledge is not None and self.knowledge.name else ""
        intro = f"Hello, I'm {self.persona_name}, your {name}." if name else f"Hello, I'm {self.persona_name}."
        return f"{intro} How can I help you today?"

    def _abilities(self, names: set[str]) -> str:
        """Only claim what this session can actually do."""
        things = []
        if self.knowledge is not None and self.knowledge.entries:
            things.append("tell you about our exhibits")
        if {"get_time", "get_date"} <= names:
            things.append("tell you the time or date")
        elif "get_time" in names or "get_date" in names:
            things.append("tell you the time" if "get_time" in names else "tell you the date")
        if "calculate" in names:
            things.append("do arithmetic")
        if "set_timer" in names:
            things.append("set timers")
        if "remember" in names:
            things.append("remember things")
        if not things:
            return "I can only chat a little right now."
        return f"I can {join_words(things)}."

    def _help(self, tool_names: set[str]) -> str:
        return (
            f"I'm {self.persona_name}, a simple offline assistant that works with rules and a knowledge base, "
            f"not a language model. {self._abilities(tool_names)}"
        )
