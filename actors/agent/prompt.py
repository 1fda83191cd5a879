"""The prompt an LLM sees, inside a token budget.

Order: the persona's system prompt, then what is known about the user
(long-term memories), then retrieved knowledge with its sources, then a
summary of the conversation's older part, then as many recent messages as
fit, ending with the user's turn. The budget is the model's context minus the
reply's tokens. Older turns are not dropped: `fold_history` moves them into
the summary (extractive here; by the LLM when `llm.summarize: llm`, see
DialogueState), so a long conversation keeps its thread at a bounded cost.

Token counts are estimates (no tokenizer for every vendor's model): one per
CJK character, about four characters per token otherwise, plus a few per
message. They err on the high side, so a prompt that fits here fits there.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from actors.providers.base import ChatMessage

MESSAGE_OVERHEAD_TOKENS = 4
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")
_FIRST_SENTENCE = re.compile(r"^(.+?[.!?。！？])(\s|$)", re.S)


def estimate_tokens(text: str) -> int:
    cjk = len(_CJK.findall(text))
    rest = len(text) - cjk
    return cjk + math.ceil(rest / 3.5)


def message_tokens(message: ChatMessage) -> int:
    calls = sum(estimate_tokens(c.name) + estimate_tokens(str(c.arguments)) for c in message.tool_calls)
    return MESSAGE_OVERHEAD_TOKENS + estimate_tokens(message.content) + calls


@dataclass
class PromptParts:
    system: str
    history: list[ChatMessage]
    memories: list[str] = field(default_factory=list)
    knowledge: str = ""
    summary: str = ""


def _turn_starts(history: list[ChatMessage]) -> list[int]:
    """Indexes where a user turn starts: the only places history may be cut
    (a tool result without its call, or a reply without its question, would
    confuse a model)."""
    return [i for i, m in enumerate(history) if m.role == "user"]


def build_prompt(parts: PromptParts, budget_tokens: int) -> list[ChatMessage]:
    """The messages to send: the system message with memories, knowledge and
    summary, then the newest whole turns that fit in what is left. The last
    turn (the user's question) is always kept; knowledge is cut before it."""
    system = parts.system
    if parts.memories:
        system += "\n\nWhat you remember about this user:\n" + "\n".join(f"- {m}" for m in parts.memories)
    if parts.summary:
        system += "\n\nSummary of the earlier conversation:\n" + parts.summary
    history = parts.history
    starts = _turn_starts(history) or [0]
    last_turn = history[starts[-1]:] if history else []
    fixed = estimate_tokens(system) + MESSAGE_OVERHEAD_TOKENS + sum(message_tokens(m) for m in last_turn)
    knowledge = parts.knowledge
    if knowledge:
        room = budget_tokens - fixed - MESSAGE_OVERHEAD_TOKENS
        if estimate_tokens(knowledge) > room:
            knowledge = _cut_to_tokens(knowledge, max(0, room))
        if knowledge:
            system += "\n\n" + knowledge
    used = estimate_tokens(system) + MESSAGE_OVERHEAD_TOKENS + sum(message_tokens(m) for m in last_turn)
    keep_from = starts[-1] if history else 0
    for start, end in zip(reversed(starts[:-1]), reversed(starts[1:])):
        cost = sum(message_tokens(m) for m in history[start:end])
        if used + cost > budget_tokens:
            break
        used += cost
        keep_from = start
    return [ChatMessage(role="system", content=system), *history[keep_from:]]


def _cut_to_tokens(text: str, tokens: int) -> str:
    """The longest prefix of whole lines within `tokens`."""
    out: list[str] = []
    total = 0
    for line in text.splitlines():
        cost = estimate_tokens(line) + 1
        if total + cost > tokens:
            break
        out.append(line)
        total += cost
    return "\n".join(out)


def history_tokens(history: list[ChatMessage]) -> int:
    return sum(message_tokens(m) for m in history)


def fold_history(history: list[ChatMessage], summary: str, keep_tokens: int, summary_tokens: int,
                 max_messages: int = 10_000) -> tuple[list[ChatMessage], list[ChatMessage], str]:
    """Move whole turns from the front of `history` into the summary until
    the rest fits `keep_tokens` and `max_messages` (the newest turn always stays).

    → (kept history, folded messages, new extractive summary). The folded
    messages are returned so a caller with an LLM can summarise them better.
    """
    starts = _turn_starts(history)
    cut = 0
    def fits(cut: int) -> bool:
        return history_tokens(history[cut:]) <= keep_tokens and len(history) - cut <= max_messages

    for start in starts[1:]:
        if fits(cut):
            break
        cut = start
    if not fits(cut) and starts and cut < starts[-1]:
        cut = starts[-1]
    if cut == 0:
        return history, [], summary
    folded = history[:cut]
    return history[cut:], folded, extractive_summary(summary, folded, summary_tokens)


def extractive_summary(summary: str, folded: list[ChatMessage], summary_tokens: int) -> str:
    """One line per folded message, its first sentence (tool traffic
    skipped); the oldest lines go first when the summary outgrows its budget."""
    lines = [line for line in summary.splitlines() if line.strip()]
    for m in folded:
        if m.role not in ("user", "assistant") or not m.content.strip():
            continue
        text = " ".join(m.content.split())
        match = _FIRST_SENTENCE.match(text)
        sentence = (match.group(1) if match else text)[:160]
        who = "User" if m.role == "user" else "Assistant"
        lines.append(f"{who}: {sentence}" + (" (interrupted)" if m.interrupted else ""))
    while lines and estimate_tokens("\n".join(lines)) > summary_tokens:
        lines.pop(0)
    return "\n".join(lines)


SUMMARY_INSTRUCTION = (
    "Summarise the conversation below for the assistant's own notes, in at most {words} words, "
    "in the conversation's language. Keep names, facts the user gave, decisions and open questions; "
    "no preamble.\n\nEarlier summary:\n{summary}\n\nConversation:\n{transcript}"
)


def summary_request(summary: str, folded: list[ChatMessage], summary_tokens: int) -> list[ChatMessage]:
    """The messages asking an LLM to fold `folded` into `summary`."""
    transcript = "\n".join(f"{m.role}: {m.content}" for m in folded if m.role in ("user", "assistant") and m.content)
    words = max(30, summary_tokens // 2)
    return [ChatMessage(role="user", content=SUMMARY_INSTRUCTION.format(
        words=words, summary=summary or "(none)", transcript=transcript))]
