"""The built-in tools: time and date, a calculator, timers and reminders,
ending the conversation, facts kept for the session, knowledge search and
long-term memory. Those that need a hook of the session (reminders, ending
the conversation, knowledge, long-term memory) are offered only to sessions
that provide it. Each takes its arguments and the session's `ToolContext` and
returns a JSON-able value, or raises `ToolError` with what to tell the model
(actors/agent/tools.py turns both into the JSON string a model reads)."""

from __future__ import annotations

import ast
import math
import operator
import re
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from actors.agent.tools import ToolContext, ToolError, ToolRegistry, maybe_await
from actors.providers.base import ToolSpec

MAX_TIMER_S = 86400
MIN_TIMER_S = 1
MAX_REMINDER_S = 7 * 86400
MAX_EXPRESSION_CHARS = 200
MAX_FACTS = 200
"""Bounds what one chatty session can make a long-lived actor hold."""
MAX_QUERY_CHARS = 500


# ------------------------------------------------------------ calculator
_BIN_OPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
    ast.Mod: operator.mod,
}
_UNARY_OPS: dict[type, Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_MAX_MAGNITUDE = 1e100


def _eval_node(node: ast.AST) -> int | float:
    if isinstance(node, ast.Expression):
        return _eval_node(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        if not abs(node.value) <= _MAX_MAGNITUDE:
            raise ToolError("the number is too large")
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY_OPS:
        return _UNARY_OPS[type(node.op)](_eval_node(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BIN_OPS:
        left, right = _eval_node(node.left), _eval_node(node.right)
        if isinstance(node.op, ast.Pow) and (abs(right) > 1000 or (abs(left) > 1 and abs(right) > 300)):
            # 9**9**9 would pin the actor's CPU for minutes.
            raise ToolError("the result is too large")
        try:
            value = _BIN_OPS[type(node.op)](left, right)
        except ZeroDivisionError:
            raise ToolError("division by zero is undefined") from None
        except OverflowError:
            raise ToolError("the result is too large") from None
        if isinstance(value, complex):
            raise ToolError("the result is not a real number")
        if abs(value) > _MAX_MAGNITUDE:
            raise ToolError("the result is too large")
        return value
    raise ToolError("only numbers, + - * / ** % and parentheses are allowed")


def evaluate(expression: str) -> int | float:
    """Arithmetic on untrusted text via the AST, never `eval`: the expression
    may come from a cloud model or a transcript, so only numbers and the six
    operators are accepted."""
    text = expression.strip().replace("×", "*").replace("÷", "/").replace("^", "**")
    if not text:
        raise ToolError("the expression is empty")
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ToolError("the expression is too long")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError):
        raise ToolError("that is not a valid arithmetic expression") from None
    value = _eval_node(tree)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ToolError("the result is too large")
        if value.is_integer() and abs(value) < 1e15:
            return int(value)
    return value


async def _calculate(args: dict[str, Any], ctx: ToolContext) -> dict[str, Any]:
    expression = args["expression"]
    return {"expression": expression.strip(), "result": evaluate(expression)}


# ------------------------------------------------------------- time/date
async def _get_time(args: dict[str, Any], ctx: ToolContext) -> dict[str, Any]:
    now = ctx.now()
    hour12 = now.hour % 12 or 12
    out = {
        "time": now.strftime("%H:%M"),
        "spoken": f"{hour12}:{now.minute:02d} {'AM' if now.hour < 12 else 'PM'}",
        "timezone": now.tzname() or "",
        "iso": now.isoformat(timespec="seconds"),
    }
    zone = getattr(now.tzinfo, "key", None)
    if zone:
        out["zone"] = zone
    return out


async def _get_date(args: dict[str, Any], ctx: ToolContext) -> dict[str, Any]:
    now = ctx.now()
    return {
        "date": now.date().isoformat(),
        "weekday": now.strftime("%A"),
        "spoken": f"{now.strftime('%A')}, {now.strftime('%B')} {now.day}, {now.year}",
    }


# ---------------------------------------------------------- timer/reminder
async def _set_timer(args: dict[str, Any], ctx: ToolContext) -> dict[str, Any]:
    seconds = float(args["seconds"])
    label = (args.get("label") or "").strip()[:80]
    if not math.isfinite(seconds) or not MIN_TIMER_S <= seconds <= MAX_TIMER_S:
        raise ToolError("a timer must be between 1 second and 24 hours long")
    if ctx.schedule_timer is not None:
        ctx.schedule_timer(seconds, label)
    elif ctx.say is not None:
        ctx.reminders.schedule(seconds, f"Your {label} timer is done." if label else "Your timer is done.", ctx.say)
    else:
        raise ToolError("timers are not available in this session")
    return {"seconds": int(seconds) if seconds.is_integer() else seconds, "label": label, "scheduled": True}


_CLOCK_RE = re.compile(r"^\s*(\d{1,2})[:.](\d{2})\s*$")


def reminder_delay(now: datetime, at: str | None, in_seconds: float | None) -> tuple[float, datetime]:
    """(seconds from now, when) for `at` (a wall-clock 'HH:MM', today or else
    tomorrow, or an ISO date-time, in the session's zone) or `in_seconds`."""
    if (at is None) == (in_seconds is None):
        raise ToolError("give either 'at' (a time) or 'in_seconds', not both")
    if in_seconds is not None:
        delay = float(in_seconds)
        if not math.isfinite(delay):
            raise ToolError("the delay is not a number")
        when = now + timedelta(seconds=max(delay, 0.0))
    else:
        assert at is not None
        text = at.strip()[:40]
        m = _CLOCK_RE.match(text)
        if m:
            hour, minute = int(m.group(1)), int(m.group(2))
            if hour > 23 or minute > 59:
                raise ToolError("that is not a time of day")
            when = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
            if when <= now:
                when += timedelta(days=1)
        else:
            try:
                when = datetime.fromisoformat(text)
            except ValueError:
                raise ToolError("'at' must be a time like '18:30' or a date-time like '2025-05-01T18:30'") from None
            if when.tzinfo is None:
                when = when.replace(tzinfo=now.tzinfo)
        delay = (when - now).total_seconds()
    if not MIN_TIMER_S <= delay <= MAX_REMINDER_S:
        raise ToolError("a reminder must be between 1 second and 7 days away")
    return delay, when


async def _set_reminder(args: dict[str, Any], ctx: ToolContext) -> dict[str, Any]:
    message = " ".join(str(args["message"]).split())[:200]
    if not message:
        raise ToolError("what should I remind you of?")
    now = ctx.now()
    delay, when = reminder_delay(now, args.get("at"), args.get("in_seconds"))
    assert ctx.say is not None
    ctx.reminders.schedule(delay, f"Reminder: {message}", ctx.say)
    return {"message": message, "at": when.isoformat(timespec="minutes"), "in_seconds": round(delay),
            "scheduled": True}


# ------------------------------------------------------- end conversation
async def _end_conversation(args: dict[str, Any], ctx: ToolContext) -> dict[str, Any]:
    assert ctx.end_conversation is not None
    ctx.end_conversation()
    return {"ending": True, "note": "Say a short goodbye now; the session closes once it has been spoken."}


# ------------------------------------------------------- session memory
_BRITISH = {"favourite": "favorite", "colour": "color", "colours": "colors", "favourites": "favorites"}


def normalize_key(key: str) -> str:
    """One spelling per fact, so "my favourite colour" (one transcript) and
    "favorite color" (another, or a cloud model) find the same entry."""
    words = re.findall(r"[a-z0-9']+", key.lower())
    while words and words[0] in ("my", "the", "your", "a", "an"):
        words = words[1:]
    return " ".join(_BRITISH.get(w, w) for w in words)


async def _remember(args: dict[str, Any], ctx: ToolContext) -> dict[str, Any]:
    key = normalize_key(args["key"])
    value = args["value"].strip()
    if not key or not value:
        raise ToolError("both a key and a value are needed")
    if key not in ctx.memory and len(ctx.memory) >= MAX_FACTS:
        raise ToolError("my memory for this session is full")
    ctx.memory[key] = value[:500]
    return {"key": key, "value": ctx.memory[key], "remembered": True}


async def _recall(args: dict[str, Any], ctx: ToolContext) -> dict[str, Any]:
    raw = args.get("key")
    if not raw or not raw.strip():
        return {"facts": dict(ctx.memory)}
    key = normalize_key(raw)
    if key in ctx.memory:
        return {"key": key, "value": ctx.memory[key], "found": True}
    return {"key": key, "value": None, "found": False}


# -------------------------------------------- knowledge and long-term memory
def _query(args: dict[str, Any], key: str = "query") -> str:
    text = " ".join(str(args[key]).split())
    if not text:
        raise ToolError(f"the {key} is empty")
    if len(text) > MAX_QUERY_CHARS:
        raise ToolError(f"the {key} is too long")
    return text


def _limit(args: dict[str, Any], default: int = 3) -> int:
    value = args.get("limit", default)
    return max(1, min(int(value), 10))


async def _knowledge_search(args: dict[str, Any], ctx: ToolContext) -> dict[str, Any]:
    assert ctx.knowledge_search is not None
    found = await maybe_await(ctx.knowledge_search(_query(args), _limit(args)))
    return {"results": list(found or [])[:10]}


async def _memory_save(args: dict[str, Any], ctx: ToolContext) -> dict[str, Any]:
    assert ctx.memory_save is not None
    fact = _query(args, "fact")
    await maybe_await(ctx.memory_save(fact))
    return {"saved": True, "fact": fact}


async def _memory_recall(args: dict[str, Any], ctx: ToolContext) -> dict[str, Any]:
    assert ctx.memory_recall is not None
    found = await maybe_await(ctx.memory_recall(_query(args), _limit(args, 5)))
    return {"memories": list(found or [])[:10]}


def spec(name: str, description: str, properties: dict[str, Any], required: list[str]) -> ToolSpec:
    return ToolSpec(
        name=name,
        description=description,
        parameters={"type": "object", "properties": properties, "required": required, "additionalProperties": False},
    )


def _has(hook: str) -> Callable[[ToolContext], bool]:
    return lambda ctx: getattr(ctx, hook) is not None


def default_registry() -> ToolRegistry:
    """The built-in tools every session gets (hook-bound ones where it has the hook)."""
    reg = ToolRegistry()
    reg.register(spec("get_time", "Get the current local time.", {}, []), _get_time)
    reg.register(spec("get_date", "Get today's local date and weekday.", {}, []), _get_date)
    reg.register(
        spec(
            "calculate",
            "Evaluate an arithmetic expression with numbers, + - * / ** % and parentheses.",
            {"expression": {"type": "string", "description": "For example '12 * 7' or '(3 + 4) ** 2'."}},
            ["expression"],
        ),
        _calculate,
    )
    reg.register(
        spec(
            "set_timer",
            "Start a countdown timer; the user is told when it ends.",
            {
                "seconds": {"type": "number", "description": "Length in seconds, 1 to 86400."},
                "label": {"type": "string", "description": "Optional short name, e.g. 'pasta'."},
            },
            ["seconds"],
        ),
        _set_timer,
    )
    reg.register(
        spec(
            "remember",
            "Remember a fact the user told you for the rest of this conversation.",
            {
                "key": {"type": "string", "description": "What the fact is about, e.g. 'name' or 'favorite color'."},
                "value": {"type": "string", "description": "The fact itself, e.g. 'Ana' or 'blue'."},
            },
            ["key", "value"],
        ),
        _remember,
    )
    reg.register(
        spec(
            "recall",
            "Look up a remembered fact by key, or all remembered facts when no key is given.",
            {"key": {"type": "string", "description": "The fact's key; omit to list everything."}},
            [],
        ),
        _recall,
    )
    reg.register(
        spec(
            "set_reminder",
            "Remind the user of something later, by voice: at a time of day or after a delay.",
            {
                "message": {"type": "string", "description": "What to remind them of, e.g. 'call mom'."},
                "at": {"type": "string", "description": "Local time 'HH:MM' (24 h) or ISO date-time; or use in_seconds."},
                "in_seconds": {"type": "number", "description": "Delay in seconds (1 to 604800); or use at."},
            },
            ["message"],
        ),
        _set_reminder, requires=_has("say"),
    )
    reg.register(
        spec("end_conversation",
              "End the conversation when the user says goodbye or asks to stop; then say a short goodbye.", {}, []),
        _end_conversation, requires=_has("end_conversation"),
    )
    reg.register(
        spec(
            "search_knowledge",
            "Search the knowledge base for facts to answer the user's question.",
            {"query": {"type": "string", "description": "What to look for."},
             "limit": {"type": "integer", "description": "How many passages, 1 to 10."}},
            ["query"],
        ),
        _knowledge_search, requires=_has("knowledge_search"),
    )
    reg.register(
        spec(
            "save_memory",
            "Save a lasting fact about the user for future conversations.",
            {"fact": {"type": "string", "description": "One short fact, e.g. 'Ana is allergic to peanuts'."}},
            ["fact"],
        ),
        _memory_save, requires=_has("memory_save"),
    )
    reg.register(
        spec(
            "recall_memory",
            "Recall lasting facts about the user from earlier conversations.",
            {"query": {"type": "string", "description": "What to recall, e.g. 'allergies'."},
             "limit": {"type": "integer", "description": "How many facts, 1 to 10."}},
            ["query"],
        ),
        _memory_recall, requires=_has("memory_recall"),
    )
    return reg
