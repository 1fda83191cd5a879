"""DialogueState child: history, persona, turn ids and the LLM loop.

It streams the LLM's reply, hands text to TTS as it arrives, runs tool calls
and feeds their results back, and, when a turn is interrupted, keeps in the
history only what the user actually heard. With moderation on, the reply
passes a `ReplyGate` first (a blocked sentence becomes the safe reply for the
client, the TTS and the history alike). A reply waiting on slow tool calls
gets a filler ("let me check"), and a turn that fails saying nothing gets
the persona's error phrase: both quick replies, played from the cache.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from actors.agent.moderation import Moderator
from actors.agent.persona import Persona
from actors.agent.prompt import PromptParts, build_prompt, estimate_tokens, fold_history, summary_request
from actors.agent.reply_gate import Release, ReplyGate
from actors.agent.tools import ToolContext, ToolRegistry
from actors.config import LLMConfig
from actors.events import ErrorCode, LLMDelta, ToolCallEvent, ToolResultEvent
from actors.mailbox import Child, Message
from actors.providers.base import LLM, ChatMessage, LLMChunk, ProviderError, ToolCall, ToolSpec
from actors.speculation import Speculation, drain, pump, same_words
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
        self._speculation: Speculation | None = None
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
        safe = self._core.tts.safe_reply
        self._core.emit(LLMDelta(turn_id=turn, text=safe))
        self._core.tts.post(TextDelta(turn, safe, checked=True, phrase=True))
        self._core.tts.post(TextEnd(turn))
        return True

    def _say_quick(self, turn: int, phrase: str | None) -> None:
        """A quick reply (filler, error phrase) to the TTS: a sentence of its
        own, played from the phrase cache; not shown as `llm.delta` nor kept
        in the history (`tts.sentence` tells the client)."""
        if phrase:
            self._core.tts.post(TextDelta(turn, phrase, checked=True, phrase=True))

    def _filler_while(self, turn: int, tools: asyncio.Future[Any], said: list[bool]) -> asyncio.TimerHandle | None:
        """The filler, said once the tool calls have run `filler_after_ms`
        (not if they are done by then, even when the loop was late to look);
        `said` gets True when it was."""
        quick = self._core.tts.quick_replies
        phrase = quick.filler(turn) if quick is not None else None
        if quick is None or phrase is None:
            return None

        def say() -> None:
            if not tools.done():
                said.append(True)
                self._say_quick(turn, phrase)

        if quick.filler_after_s <= 0:
            say()
            return None
        return asyncio.get_running_loop().call_later(quick.filler_after_s, say)

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
        if not self.idle or (self.moderator is not None and self.moderator.check_rules(text).blocked):
            return  # blocked words never reach the LLM, not even speculatively
        spec = Speculation(turn, text, len(self.history))
        history = [*self.history, ChatMessage(role="user", content=text)]
        spec.task = asyncio.get_running_loop().create_task(
            pump(spec, self._llm, lambda: self._prompt(history), self._tool_specs(), self.moderator))
        self._speculation = spec
        self.preemptive["started"] += 1

    def cancel_speculation(self, turn: int | None = None) -> None:
        """Speech resumed, a new utterance began, or the session ends: the
        speculative reply is dropped and its LLM stream closed."""
        spec = self._speculation
        if spec is not None and (turn is None or spec.turn <= turn):
            self._speculation = None
            self.preemptive["discarded"] += 1
            if spec.task is not None:
                spec.task.cancel()

    def _take_speculation(self, turn: int, text: str) -> Speculation | None:
        spec = self._speculation
        if spec is None:
            return None
        if (not spec.blocked and spec.turn == turn and spec.history_len == len(self.history)
                and same_words(spec.text, text)):
            self._speculation = None
            self.preemptive["used"] += 1
            return spec
        log.debug("session %s turn %d: preemptive reply on %r discarded (final %r)",
                  self._core.session_id, turn, spec.text, text)
        self.cancel_speculation()
        return None

    async def handle(self, message: Message) -> None:
        turn = message.turn_id
        assert turn is not None
        if isinstance(message, AssistantSays):
            said: list[str] = []
            gate = self._gate(lambda text, phrase=False: said.append(text))
            if gate is None:
                said.append(message.text)
            else:
                gate.feed(message.text)
                await gate.flush()
            self._record_reply(turn, "".join(said).strip())
            self._core.history_changed()
            self._core.tts.post(TextDelta(turn, "".join(said), checked=gate is not None, phrase=True))
            self._core.tts.post(TextEnd(turn))
            return
        assert isinstance(message, UserTurn)
        if await self._blocked(turn, message.text):
            return
        spec = self._take_speculation(turn, message.text)
        self._remember(message.text)
        self.history.append(ChatMessage(role="user", content=message.text))
        self._core.history_changed()
        reply_parts: list[str] = []
        failed = True
        try:
            await self._run_llm(turn, spec, reply_parts)
            failed = False
        except ProviderError as e:
            log.warning("session %s turn %d: the language model failed: %s", self._core.session_id, turn,
                        e.message, exc_info=True)
            self._core.emit_error(_llm_code(e.code), e.message, turn)
        except Exception as e:  # a vendor SDK raising its own types
            log.exception("session %s turn %d: the language model raised", self._core.session_id, turn)
            self._core.emit_error(ErrorCode.LLM_FAILED, f"the language model failed: {type(e).__name__}", turn)
        reply = "".join(reply_parts).strip()
        if failed and not reply and (quick := self._core.tts.quick_replies) is not None:
            self._say_quick(turn, quick.error())  # no fallback answered: the user hears why, not silence
        self._record_reply(turn, reply)
        self._core.tts.post(TextEnd(turn))
        self._trim()
        self._core.history_changed()

    def _gate(self, release: Release) -> ReplyGate | None:
        """Moderation's post-check on one turn's text, or None when off."""
        if self.moderator is None or not self.moderator.active:
            return None
        return ReplyGate(self.moderator, self._core.tts.safe_reply, release)

    async def _run_llm(self, turn: int, spec: Speculation | None = None,
                       reply_parts: list[str] | None = None) -> str:
        """The reply's LLM rounds (tool calls feed the next); the first round
        is the speculative one when the final transcript confirmed it.
        `reply_parts` gets the text as it is shown and spoken, so a failing
        round keeps what was said before it."""
        timer = self._core.timer(turn)
        timer.llm_start = time.time() if spec is None else spec.started
        if spec is not None:
            timer.preemptive, timer.llm_first = True, spec.first_text_at
        reply_parts = [] if reply_parts is None else reply_parts
        gate = self._gate(lambda text, phrase=False: reply_parts.append(text))  # one per turn: one safe reply
        try:
            return await self._rounds(turn, spec, reply_parts, gate)
        finally:
            if gate is not None:
                gate.close()

    async def _rounds(self, turn: int, spec: Speculation | None, reply_parts: list[str],
                      gate: ReplyGate | None) -> str:
        filler_due = True  # said once per turn at most
        await self._tools.prepare()  # MCP servers' tools: listed once per session, bounded wait
        rounds = self._tools.max_rounds
        for_turn = getattr(self._llm, "for_turn", None)  # a failover chain: later rounds keep the provider that answered
        llm = for_turn() if for_turn is not None else self._llm
        for round_no in range(rounds + 1):
            round_text: list[str] = []
            last = round_no == rounds  # the depth limit: no tools offered, the model must answer now
            source = (drain(spec) if spec is not None
                      else llm.stream(await self._prompt(self.history), [] if last else self._tool_specs()))
            spec = None
            try:
                async with aclosing(source) as chunks:
                    calls = await self._consume(turn, chunks, round_text, gate)
            finally:
                reply_parts.extend(round_text)
            if not calls or last:
                break
            self.history.append(ChatMessage(role="assistant", content="".join(round_text), tool_calls=calls))
            if await self._run_tools(turn, calls, filler=filler_due and not "".join(reply_parts).strip()):
                filler_due = False
        return "".join(reply_parts).strip()

    async def _run_tools(self, turn: int, calls: list[ToolCall], filler: bool = False) -> bool:
        """One round's calls, run concurrently; each is bounded by the
        registry's per-call timeout and fails as an `{"error": ...}` result.
        When the turn is interrupted the calls are cancelled (device and MCP
        calls included) and each still gets a result in the history, since
        an OpenAI-compatible API refuses a tool call left unanswered.
        `filler`: a filler is said if they run long (`_filler_while`); → whether it was."""
        results: list[str | None] = [None] * len(calls)

        async def run(i: int, call: ToolCall) -> None:
            if not self.persona.allows_tool(call.name):
                results[i] = json.dumps({"error": f"the tool '{call.name[:64]}' is not available"})
            else:
                results[i] = await self._tools.run(call, self._tool_ctx)
            self._core.emit(ToolResultEvent(turn_id=turn, name=call.name, result=results[i]))

        for call in calls:
            self._core.emit(ToolCallEvent(turn_id=turn, name=call.name, arguments=call.arguments))
        gathered = asyncio.gather(*(run(i, c) for i, c in enumerate(calls)))
        said: list[bool] = []
        waiting = self._filler_while(turn, gathered, said) if filler else None
        try:
            await gathered
        finally:
            if waiting is not None:
                waiting.cancel()
            for call, result in zip(calls, results):
                content = result if result is not None else '{"error": "cancelled: the user interrupted"}'
                self.history.append(ChatMessage(role="tool", content=content, tool_call_id=call.id))
        return bool(said)

    async def _consume(self, turn: int, chunks: AsyncIterator[LLMChunk], round_text: list[str],
                       gate: ReplyGate | None = None) -> list[ToolCall]:
        """One LLM round: text to the client and TTS as it streams, tool calls
        and usage kept. `aclosing` around it closes the stream (the HTTP
        connection of a cloud LLM) when the turn is interrupted."""
        timer = self._core.timer(turn)
        calls: list[ToolCall] = []
        emotions = EmotionFilter()  # `[happy]`-style tags leave the text; the first emotion goes out once

        def release(text: str, phrase: bool = False) -> None:
            round_text.append(text)
            self._core.emit(LLMDelta(turn_id=turn, text=text))
            self._core.tts.post(TextDelta(turn, text, checked=gate is not None, phrase=phrase))

        if gate is not None:
            gate.release = release

        def show(text: str, emotion: str | None) -> None:
            if emotion:
                self._core.tts.note_emotion(turn, emotion)
            if text and gate is None:
                release(text)
            elif text and gate is not None:
                gate.feed(text)

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
        if gate is not None:
            await gate.flush()  # before the round's tool calls run: what was said so far is out
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
