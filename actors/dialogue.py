"""DialogueState child: history, persona, turn ids and the LLM loop.

It streams the LLM's reply, hands text to TTS as it arrives, runs tool calls
and feeds their results back, and, when a turn is interrupted, keeps in the
history only what the user actually heard.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING

from actors.config import Persona
from actors.events import ErrorCode, LLMDelta, LLMEmotion, ToolCallEvent, ToolResultEvent
from actors.mailbox import Child, Message
from actors.providers.base import LLM, ChatMessage, LLMChunk, ProviderError, ToolCall
from actors.tools import ToolContext, ToolRegistry
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
                 persona: Persona, max_history: int, history: list[ChatMessage] | None = None) -> None:
        super().__init__(core.child_crashed)
        self._core = core
        self._llm = llm
        self._tools = tools
        self._tool_ctx = tool_context
        self._persona = persona
        self._max_history = max_history
        self.history: list[ChatMessage] = list(history or [])
        self._assistant_at: dict[int, int] = {}
        """turn id → index of that turn's assistant reply in history."""

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
        self.history.append(ChatMessage(role="user", content=message.text))
        self._core.history_changed()
        reply = ""
        try:
            reply = await self._run_llm(turn)
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

    async def _run_llm(self, turn: int) -> str:
        timer = self._core.timer(turn)
        timer.llm_start = time.time()
        reply_parts: list[str] = []
        for _ in range(MAX_TOOL_ROUNDS + 1):
            round_text: list[str] = []
            async with aclosing(self._llm.stream(self._prompt(), self._tools.specs())) as chunks:
                calls = await self._consume(turn, chunks, round_text)
            reply_parts.extend(round_text)
            if not calls:
                break
            self.history.append(ChatMessage(role="assistant", content="".join(round_text), tool_calls=calls))
            for call in calls:
                self._core.emit(ToolCallEvent(turn_id=turn, name=call.name, arguments=call.arguments))
                result = await self._tools.run(call, self._tool_ctx)
                self._core.emit(ToolResultEvent(turn_id=turn, name=call.name, result=result))
                self.history.append(ChatMessage(role="tool", content=result, tool_call_id=call.id))
        return "".join(reply_parts).strip()

    async def _consume(self, turn: int, chunks: AsyncIterator[LLMChunk], round_text: list[str]) -> list[ToolCall]:
        """One LLM round: text to the client and TTS as it streams, tool calls
        and usage kept. `aclosing` around it closes the stream (the HTTP
        connection of a cloud LLM) when the turn is interrupted."""
        timer = self._core.timer(turn)
        calls: list[ToolCall] = []
        async for chunk in chunks:
            if chunk.emotion:
                self._core.emit(LLMEmotion(turn_id=turn, emotion=chunk.emotion))
            if chunk.text:
                if timer.llm_first is None:
                    timer.llm_first = time.time()
                round_text.append(chunk.text)
                self._core.emit(LLMDelta(turn_id=turn, text=chunk.text))
                self._core.tts.post(TextDelta(turn, chunk.text))
            if chunk.tool_call:
                calls.append(chunk.tool_call)
            if chunk.usage:
                timer.add_usage(chunk.usage)
        return calls

    def _prompt(self) -> list[ChatMessage]:
        return [ChatMessage(role="system", content=self._persona.system_prompt), *self.history]

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
        excess = len(self.history) - self._max_history
        if excess > 0:
            # never start history on a tool result whose call was trimmed away
            while excess < len(self.history) and self.history[excess].role == "tool":
                excess += 1
            del self.history[:excess]
            self._assistant_at = {t: i - excess for t, i in self._assistant_at.items() if i >= excess}
