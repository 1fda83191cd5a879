"""DialogueState child: history, persona, turn ids and the LLM loop.

It streams the LLM's reply, hands text to TTS as it arrives, runs tool calls
and feeds their results back, and, when a turn is interrupted, keeps in the
history only what the user actually heard.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from actors.agent.moderation import Moderator
from actors.agent.persona import Persona
from actors.agent.prompt import PromptParts, build_prompt, estimate_tokens, fold_history, summary_request
from actors.agent.tools import ToolContext, ToolRegistry
from actors.config import LLMConfig
from actors.events import ErrorCode, LLMDelta, ToolCallEvent, ToolResultEvent
from actors.mailbox import Child, Message
from actors.providers.base import LLM, ChatMessage, LLMChunk, ProviderError, ToolCall, ToolSpec
from actors.text import EmotionFilter
from actors.tts import TextDelta, TextEnd

if TYPE_CHECKING:
    from actors.session_core import SessionCore

log = logging.getLogger(__name__)


def _llm_code(code: str) -> ErrorCode:
    """A provider's own stable code where the protocol knows it, else llm.failed."""
    try:
        return ErrorCode(code)
    except ValueError:
        return ErrorCode.LLM_FAILED

MAX_TOOL_ROUNDS = 3


@dataclass
class UserTurn(Message):
    text: str = ""


@dataclass
class AssistantSays(Message):
    """The assistant speaks unprompted (a timer went off)."""

    text: str = ""


@dataclass
class _Speculation:
    """A reply started at a pause on the words heard so far; its chunks wait
    here, unseen, until the final transcript confirms or discards them."""

    turn: int
    text: str
    history_len: int
    started: float = field(default_factory=time.time)
    chunks: asyncio.Queue[LLMChunk | BaseException | None] = field(default_factory=asyncio.Queue)
    task: asyncio.Task[None] | None = None
    first_text_at: float | None = None


def same_words(a: str, b: str) -> bool:
    """Equal but for case, spaces and punctuation (a final transcript adds
    punctuation its interims lacked)."""
    def squash(s: str) -> str:
        return re.sub(r"[\W_]+", "", s.lower())
    return squash(a) == squash(b)


class DialogueState(Child):
    name = "dialogue"

    def __init__(self, core: SessionCore, llm: LLM, tools: ToolRegistry, tool_context: ToolContext,
                 persona: Persona, max_history: int, history: list[ChatMessage] | None = None, *,
                 llm_config: LLMConfig | None = None, summary: str = "") -> None:
        super().__init__(core.child_crashed)
        self._core = core
        self._llm = llm
        self._tools = tools
        self._tool_ctx = tool_context
        self.persona = persona
        self._max_history = max_history
        self._llm_cfg = llm_config or LLMConfig()
        self.history: list[ChatMessage] = list(history or [])
        self.summary = summary
        """Older turns, folded out of `history` (agent/prompt.py); stored with it."""
        self.recall_memories: Callable[[str], Awaitable[list[str]]] | None = None
        """Long-term memories relevant to the user's words, when the session has a store."""
        self.retrieve_knowledge: Callable[[str], Awaitable[str]] | None = None
        """Retrieved knowledge with its sources, formatted for the prompt."""
        self.remember_from: Callable[[str, str], Awaitable[Any]] | None = None
        """Keeps what the user asked to be remembered (or, by policy, said about
        themselves) in long-term memory: (user text, persona memory policy)."""
        self._remembering: set[asyncio.Task[Any]] = set()
        self.moderator: Moderator | None = None
        """Checks the user's words before the LLM sees them (agent/moderation.py)."""
        self._summarizing: asyncio.Task[None] | None = None
        self._assistant_at: dict[int, int] = {}
        """turn id → index of that turn's assistant reply in history."""
        self._speculation: _Speculation | None = None
        self.preemptive = {"started": 0, "used": 0, "discarded": 0}

    async def _blocked(self, turn: int, text: str) -> bool:
        """Moderation's pre-check: a blocked message never reaches the LLM or
        the history; the persona's safe reply answers it."""
        if self.moderator is None:
            return False
        verdict = await self.moderator.check_user(text)
        if not verdict.blocked:
            return False
        self.cancel_speculation()
        safe = self.persona.safe_reply_text()
        self._core.emit(LLMDelta(turn_id=turn, text=safe))
        self._core.tts.post(TextDelta(turn, safe))
        self._core.tts.post(TextEnd(turn))
        return True

    def _remember(self, text: str) -> None:
        """Long-term memory is written beside the reply, never before it."""
        if self.remember_from is None or self.persona.memory == "off":
            return

        async def run() -> None:
            try:
                await self.remember_from(text, self.persona.memory)
            except Exception as e:
                log.warning("session %s: could not keep a memory: %s", self._core.session_id, type(e).__name__)

        task = asyncio.get_running_loop().create_task(run())
        self._remembering.add(task)
        task.add_done_callback(self._remembering.discard)

    def set_llm(self, llm: LLM) -> None:
        self._llm = llm

    # ------------------------------------------------------------ preemptive generation
    @property
    def idle(self) -> bool:
        return (self._work is None or self._work.done()) and self._mailbox.empty()

    def speculate(self, turn: int, text: str) -> None:
        """Start the LLM on the words so far, at a pause, before the turn is
        sure to have ended. Nothing is shown or spoken until `handle` sees the
        final transcript; a busy dialogue (a reply still running) does not
        speculate, since its history is about to change."""
        self.cancel_speculation()
        if not self.idle:
            return
        spec = _Speculation(turn, text, len(self.history))
        spec.task = asyncio.get_running_loop().create_task(self._pump(spec, [*self.history,
                                                                              ChatMessage(role="user", content=text)]))
        self._speculation = spec
        self.preemptive["started"] += 1

    async def _pump(self, spec: _Speculation, history: list[ChatMessage]) -> None:
        try:
            prompt = await self._prompt(history)
            async with aclosing(self._llm.stream(prompt, self._tool_specs())) as chunks:
                async for chunk in chunks:
                    if chunk.text and spec.first_text_at is None:
                        spec.first_text_at = time.time()
                    spec.chunks.put_nowait(chunk)
        except Exception as e:  # handed to the turn, which reports it as a live stream's error
            spec.chunks.put_nowait(e)
        spec.chunks.put_nowait(None)

    def cancel_speculation(self, turn: int | None = None) -> None:
        """Speech resumed, a new utterance began, or the session ends: the
        speculative reply is dropped and its LLM stream closed."""
        spec = self._speculation
        if spec is not None and (turn is None or spec.turn <= turn):
            self._speculation = None
            self.preemptive["discarded"] += 1
            if spec.task is not None:
                spec.task.cancel()

    def _take_speculation(self, turn: int, text: str) -> _Speculation | None:
        spec = self._speculation
        if spec is None:
            return None
        if spec.turn == turn and spec.history_len == len(self.history) and same_words(spec.text, text):
            self._speculation = None
            self.preemptive["used"] += 1
            return spec
        log.debug("session %s turn %d: preemptive reply on %r discarded (final %r)",
                  self._core.session_id, turn, spec.text, text)
        self.cancel_speculation()
        return None

    @staticmethod
    async def _drain(spec: _Speculation) -> AsyncIterator[LLMChunk]:
        """The speculative stream's chunks, then the rest as they come; closing
        this closes the LLM stream behind it."""
        try:
            while (item := await spec.chunks.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if spec.task is not None:
                spec.task.cancel()

    async def handle(self, message: Message) -> None:
        turn = message.turn_id
        assert turn is not None
        if isinstance(message, AssistantSays):
            self._record_reply(turn, message.text)
            self._core.history_changed()
            self._core.tts.post(TextDelta(turn, message.text))
            self._core.tts.post(TextEnd(turn))
            return
        assert isinstance(message, UserTurn)
        if await self._blocked(turn, message.text):
            return
        spec = self._take_speculation(turn, message.text)
        self._remember(message.text)
        self.history.append(ChatMessage(role="user", content=message.text))
        self._core.history_changed()
        reply = ""
        try:
            reply = await self._run_llm(turn, spec)
        except ProviderError as e:
            log.warning("session %s turn %d: the language model failed: %s", self._core.session_id, turn,
                        e.message, exc_info=True)
            self._core.emit_error(_llm_code(e.code), e.message, turn)
        except Exception as e:  # a vendor SDK raising its own types
            log.exception("session %s turn %d: the language model raised", self._core.session_id, turn)
            self._core.emit_error(ErrorCode.LLM_FAILED, f"the language model failed: {type(e).__name__}", turn)
        self._record_reply(turn, reply)
        self._core.tts.post(TextEnd(turn))
        self._trim()
        self._core.history_changed()

    async def _run_llm(self, turn: int, spec: _Speculation | None = None) -> str:
        """The reply's LLM rounds (tool calls feed the next); the first round
        is the speculative one when the final transcript confirmed it."""
        timer = self._core.timer(turn)
        timer.llm_start = time.time() if spec is None else spec.started
        if spec is not None:
            timer.preemptive, timer.llm_first = True, spec.first_text_at
        reply_parts: list[str] = []
        await self._tools.prepare()  # MCP servers' tools: listed once per session, bounded wait
        rounds = self._tools.max_rounds
        for_turn = getattr(self._llm, "for_turn", None)  # a failover chain: later rounds keep the provider that answered
        llm = for_turn() if for_turn is not None else self._llm
        for round_no in range(rounds + 1):
            round_text: list[str] = []
            last = round_no == rounds  # the depth limit: no tools offered, the model must answer now
            source = (self._drain(spec) if spec is not None
                      else llm.stream(await self._prompt(self.history), [] if last else self._tool_specs()))
            spec = None
            async with aclosing(source) as chunks:
                calls = await self._consume(turn, chunks, round_text)
            reply_parts.extend(round_text)
            if not calls or last:
                break
            self.history.append(ChatMessage(role="assistant", content="".join(round_text), tool_calls=calls))
            await self._run_tools(turn, calls)
        return "".join(reply_parts).strip()

    async def _run_tools(self, turn: int, calls: list[ToolCall]) -> None:
        """One round's calls, run concurrently; each is bounded by the
        registry's per-call timeout and fails as an `{"error": ...}` result.
        When the turn is interrupted the calls are cancelled (device and MCP
        calls included) and each still gets a result in the history, since
        an OpenAI-compatible API refuses a tool call left unanswered."""
        results: list[str | None] = [None] * len(calls)

        async def run(i: int, call: ToolCall) -> None:
            if not self.persona.allows_tool(call.name):
                results[i] = json.dumps({"error": f"the tool '{call.name[:64]}' is not available"})
            else:
                results[i] = await self._tools.run(call, self._tool_ctx)
            self._core.emit(ToolResultEvent(turn_id=turn, name=call.name, result=results[i]))

        for call in calls:
            self._core.emit(ToolCallEvent(turn_id=turn, name=call.name, arguments=call.arguments))
        try:
            await asyncio.gather(*(run(i, c) for i, c in enumerate(calls)))
        finally:
            for call, result in zip(calls, results):
                content = result if result is not None else '{"error": "cancelled: the user interrupted"}'
                self.history.append(ChatMessage(role="tool", content=content, tool_call_id=call.id))

    async def _consume(self, turn: int, chunks: AsyncIterator[LLMChunk], round_text: list[str]) -> list[ToolCall]:
        """One LLM round: text to the client and TTS as it streams, tool calls
        and usage kept. `aclosing` around it closes the stream (the HTTP
        connection of a cloud LLM) when the turn is interrupted."""
        timer = self._core.timer(turn)
        calls: list[ToolCall] = []
        emotions = EmotionFilter()  # `[happy]`-style tags leave the text; the first emotion goes out once

        def show(text: str, emotion: str | None) -> None:
            if emotion:
                self._core.tts.note_emotion(turn, emotion)
            if text:
                round_text.append(text)
                self._core.emit(LLMDelta(turn_id=turn, text=text))
                self._core.tts.post(TextDelta(turn, text))

        async for chunk in chunks:
            if chunk.emotion:
                self._core.tts.note_emotion(turn, chunk.emotion)
            if chunk.text:
                if timer.llm_first is None:
                    timer.llm_first = time.time()
                show(*emotions.feed(chunk.text))
            if chunk.tool_call:
                calls.append(chunk.tool_call)
            if chunk.usage:
                timer.add_usage(chunk.usage)
        show(*emotions.flush())
        return calls

    def _tool_specs(self) -> list[ToolSpec]:
        """The tools this persona may use."""
        return [s for s in self._tools.specs() if self.persona.allows_tool(s.name)]

    @property
    def budget_tokens(self) -> int:
        """The model's context minus the reply's room."""
        cfg = self._llm_cfg
        return cfg.context_tokens - max(cfg.reply_tokens, self.persona.max_tokens or 0)

    async def _prompt(self, history: list[ChatMessage]) -> list[ChatMessage]:
        """System prompt, memories, knowledge and summary, then the newest turns
        that fit the budget (agent/prompt.py). Memory and knowledge lookups
        use the user's last words; a failing lookup leaves its part out."""
        query = next((m.content for m in reversed(history) if m.role == "user"), "")
        memories: list[str] = []
        knowledge = ""
        if query and self.recall_memories is not None and self.persona.memory != "off":
            try:
                memories = await self.recall_memories(query)
            except Exception:
                log.warning("session %s: memory recall failed", self._core.session_id, exc_info=True)
        if query and self.retrieve_knowledge is not None and self.persona.knowledge:
            try:
                knowledge = await self.retrieve_knowledge(query)
            except Exception:
                log.warning("session %s: knowledge retrieval failed", self._core.session_id, exc_info=True)
        parts = PromptParts(system=self.persona.system_prompt, history=history, memories=memories,
                            knowledge=knowledge, summary=self.summary)
        return build_prompt(parts, self.budget_tokens)

    def _record_reply(self, turn: int, text: str) -> None:
        if text:
            self._assistant_at[turn] = len(self.history)
            self.history.append(ChatMessage(role="assistant", content=text))

    def record_interrupted(self, turn: int, heard: str) -> None:
        """Replace (or add) this turn's reply with the part that was heard."""
        msg = ChatMessage(role="assistant", content=heard, interrupted=True)
        index = self._assistant_at.get(turn)
        if index is not None and index < len(self.history):
            self.history[index] = msg
        else:
            self._assistant_at[turn] = len(self.history)
            self.history.append(msg)
        self._core.history_changed()

    def _trim(self) -> None:
        """Fold the oldest whole turns into the summary once recent history
        outgrows its share of the budget or `max_history_messages`."""
        cfg = self._llm_cfg
        before = self.summary
        kept, folded, summary = fold_history(self.history, self.summary, int(self.budget_tokens * cfg.history_share),
                                             cfg.summary_tokens, self._max_history)
        if not folded:
            return
        cut = len(folded)
        self.history, self.summary = kept, summary
        self._assistant_at = {t: i - cut for t, i in self._assistant_at.items() if i >= cut}
        if cfg.summarize == "llm" and (self._summarizing is None or self._summarizing.done()):
            self._summarizing = asyncio.get_running_loop().create_task(self._summarize(before, folded, summary))

    async def _summarize(self, before: str, folded: list[ChatMessage], extractive: str) -> None:
        """The LLM's own summary replaces the extractive one, unless more turns
        were folded meanwhile (then the extractive lines stay: nothing lost)."""
        try:
            request = summary_request(before, folded, self._llm_cfg.summary_tokens)
            async with aclosing(self._llm.stream(request, [])) as chunks:
                text = "".join([c.text async for c in chunks]).strip()
        except Exception:
            log.warning("session %s: LLM summary failed; keeping the extractive one", self._core.session_id,
                        exc_info=True)
            return
        if text and self.summary == extractive:
            self.summary = _cut_summary(text, self._llm_cfg.summary_tokens)
            self._core.history_changed()


def _cut_summary(text: str, tokens: int) -> str:
    return text if estimate_tokens(text) <= tokens else text[: tokens * 2]
