"""One streamed reply, chunk by chunk: text deltas out at once, tool calls
assembled from their fragments, the token usage kept for last."""

from __future__ import annotations

import dataclasses
import json
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

from actors.providers.base import LLMChunk, ToolCall

log = logging.getLogger(__name__)


@dataclass
class _PartialCall:
    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)


class ToolCallAssembler:
    """Tool calls from their streamed fragments, keyed by `index`.

    `id` and `name` come in a call's first fragment (some servers repeat
    them, possibly empty, later: only non-empty values count); `arguments`
    come in pieces to concatenate; parallel calls may interleave.
    """

    def __init__(self) -> None:
        self._calls: dict[int, _PartialCall] = {}

    def __bool__(self) -> bool:
        return bool(self._calls)

    def add(self, fragment: Any) -> None:
        call = self._calls.setdefault(self._index_of(fragment), _PartialCall())
        if getattr(fragment, "id", None):
            call.id = fragment.id
        function = getattr(fragment, "function", None)
        if function is not None:
            if function.name:
                call.name = function.name
            if function.arguments:
                call.arguments.append(function.arguments)

    def _index_of(self, fragment: Any) -> int:
        """Servers that leave out `index` start a new call with a new id."""
        if getattr(fragment, "index", None) is not None:
            return fragment.index
        if not self._calls:
            return 0
        last = max(self._calls)
        new_id = getattr(fragment, "id", None)
        return last + 1 if new_id and new_id != self._calls[last].id else last

    def flush(self) -> list[ToolCall]:
        """The calls assembled so far, in index order; forgets them."""
        calls = [self._finish(self._calls[i]) for i in sorted(self._calls)]
        self._calls.clear()
        return calls

    @staticmethod
    def _finish(call: _PartialCall) -> ToolCall:
        return ToolCall(id=call.id or f"call_{uuid.uuid4().hex[:24]}", name=call.name,
                        arguments=parse_arguments("".join(call.arguments), call.name))


def parse_arguments(text: str, name: str = "") -> dict[str, Any]:
    """A JSON object; "" means no arguments; anything else is kept as
    `{"_raw": text}` so the tool registry reports it to the model."""
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if isinstance(value, dict):
        return value
    log.warning("tool call %r: arguments are not a JSON object; passed on as _raw", name)
    return {"_raw": text}


class ReplyState:
    """What one streamed reply has produced so far."""

    def __init__(self) -> None:
        self.calls = ToolCallAssembler()
        self.usage: dict[str, int] | None = None
        self.progressed = False
        """A text, tool-call or reasoning delta arrived (the first token)."""
        self.finished = False
        """A finish_reason arrived: the reply itself is complete."""

    def take(self, chunk: Any) -> list[LLMChunk]:
        """Chunks to yield for one SDK chunk."""
        out: list[LLMChunk] = []
        usage = getattr(chunk, "usage", None)
        if usage is not None:
            self.usage = usage_dict(usage)
        for choice in chunk.choices:  # the usage chunk has none
            if choice.index != 0:
                continue
            out += self._take_delta(choice.delta)
            if choice.finish_reason:
                out += self._take_finish(choice.finish_reason)
        return out

    def _take_delta(self, delta: Any) -> list[LLMChunk]:
        if delta is None:
            return []
        for fragment in delta.tool_calls or []:
            self.calls.add(fragment)
            self.progressed = True
        if getattr(delta, "reasoning_content", None):
            self.progressed = True  # a thinking model is working, not stalled
        if delta.content:
            self.progressed = True
            return [LLMChunk(text=delta.content)]
        return []

    def _take_finish(self, reason: str) -> list[LLMChunk]:
        self.finished = True
        if reason == "length":
            log.info("LLM reply cut at max_tokens")
        elif reason == "content_filter":
            log.warning("LLM reply stopped by the provider's content filter")
        return [LLMChunk(tool_call=c) for c in self.calls.flush()] if reason == "tool_calls" else []

    def finish(self) -> list[LLMChunk]:
        """Tool calls still held when the stream ended (servers that end a
        tool-call reply with finish_reason "stop", or none)."""
        return [LLMChunk(tool_call=c) for c in self.calls.flush()]


def usage_dict(usage: Any) -> dict[str, int]:
    return {k: int(getattr(usage, k, 0) or 0) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}


@dataclass
class UsageChunk(LLMChunk):
    """`LLMChunk` with the reply's token usage, until base.py's LLMChunk has
    a `usage` field of its own (then `usage_chunk` builds a plain one)."""

    usage: dict[str, int] | None = None


_CHUNK_HAS_USAGE = "usage" in {f.name for f in dataclasses.fields(LLMChunk)}


def usage_chunk(usage: dict[str, int]) -> LLMChunk:
    """The last chunk of a reply: no text, only `usage`."""
    return LLMChunk(usage=usage) if _CHUNK_HAS_USAGE else UsageChunk(usage=usage)  # type: ignore[call-arg]
