"""Built-in tools and the one registry the product uses.

The local dialogue engine and a cloud LLM see the same tools (as OpenAI-style
function schemas from `ToolRegistry.specs()`), so a tool behaves identically
whichever "brain" asked for it. Tools return JSON strings and never raise:
a model can read an `{"error": ...}` result and say something sensible, while
an exception would end the user's turn with nothing said.
"""

from __future__ import annotations

import ast
import json
import math
import operator
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from actors.providers.base import ToolCall, ToolSpec

MAX_TIMER_S = 86400
MIN_TIMER_S = 1
MAX_EXPRESSION_CHARS = 200
MAX_FACTS = 200
"""Bounds what one chatty session can make a long-lived actor hold."""


def _local_now() -> datetime:
    return datetime.now().astimezone()


@dataclass
class ToolContext:
    """Per-session state a tool may read or change.

    Tools live in one shared registry, so anything session-specific (memory,
    the timer scheduler, the clock) comes in here rather than living on the
    tool; tests inject a fixed clock through `now`.
    """

    memory: dict[str, str] = field(default_factory=dict)
    schedule_timer: Callable[[float, str], None] | None = None
    now: Callable[[], datetime] = _local_now


class ToolError(Exception):
    """Raised by a tool for a problem the user should hear about."""


ToolFn = Callable[[dict[str, Any], ToolContext], Awaitable[dict[str, Any]] | dict[str, Any]]


@dataclass
class _Tool:
    spec: ToolSpec
    fn: ToolFn


def _result(payload: dict[str, Any]) -> str:
    return json.dumps(payload, ensure_ascii=False)


def _error(message: str) -> str:
    return _result({"error": message})


# ------------------------------------------------------------- arguments
_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "number": (int, float),
    "integer": (int,),
    "boolean": (bool,),
}


def _check_arguments(spec: ToolSpec, args: Any) -> str | None:
    """A small subset of JSON Schema: enough to reject what models get wrong
    (missing keys, a number sent as text), without a validator dependency."""
    if not isinstance(args, dict):
        return "arguments must be a JSON object"
    props: dict[str, Any] = spec.parameters.get("properties", {})
    for name in spec.parameters.get("required", []):
        if name not in args or args[name] is None:
            return f"missing required argument '{name}'"
    for name, value in args.items():
        if name not in props:
            return f"unexpected argument '{name}'"
        if value is None:
            continue
        expected = _JSON_TYPES.get(props[name].get("type", ""))
        # bool is an int subclass in Python, but never a number in JSON.
        if expected and (not isinstance(value, expected) or (isinstance(value, bool) and bool not in expected)):
            return f"argument '{name}' must be a {props[name]['type']}"
    return None


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
    return {
        "time": now.strftime("%H:%M"),
        "spoken": f"{hour12}:{now.minute:02d} {'AM' if now.hour < 12 else 'PM'}",
        "timezone": now.tzname() or "",
        "iso": now.isoformat(timespec="seconds"),
    }


async def _get_date(args: dict[str, Any], ctx: ToolContext) -> dict[str, Any]:
    now = ctx.now()
    return {
        "date": now.date().isoformat(),
        "weekday": now.strftime("%A"),
        "spoken": f"{now.strftime('%A')}, {now.strftime('%B')} {now.day}, {now.year}",
    }


# ----------------------------------------------------------------- timer
async def _set_timer(args: dict[str, Any], ctx: ToolContext) -> dict[str, Any]:
    seconds = float(args["seconds"])
    label = (args.get("label") or "").strip()[:80]
    if not math.isfinite(seconds) or not MIN_TIMER_S <= seconds <= MAX_TIMER_S:
        raise ToolError("a timer must be between 1 second and 24 hours long")
    if ctx.schedule_timer is None:
        raise ToolError("timers are not available in this session")
    ctx.schedule_timer(seconds, label)
    return {"seconds": int(seconds) if seconds.is_integer() else seconds, "label": label, "scheduled": True}


# ---------------------------------------------------------------- memory
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


# -------------------------------------------------------------- registry
class ToolRegistry:
    """Name → tool; the single place a tool call becomes a result."""

    def __init__(self) -> None:
        self._tools: dict[str, _Tool] = {}

    def register(self, spec: ToolSpec, fn: ToolFn) -> None:
        self._tools[spec.name] = _Tool(spec, fn)

    def names(self) -> list[str]:
        return list(self._tools)

    def specs(self) -> list[ToolSpec]:
        return [t.spec for t in self._tools.values()]

    async def run(self, call: ToolCall, ctx: ToolContext) -> str:
        """Run one call; every failure becomes an `{"error": ...}` result so
        the model can explain it instead of the turn dying."""
        tool = self._tools.get(call.name)
        if tool is None:
            return _error(f"unknown tool '{call.name}'")
        problem = _check_arguments(tool.spec, call.arguments)
        if problem:
            return _error(problem)
        try:
            out = tool.fn(dict(call.arguments), ctx)
            if isinstance(out, Awaitable):
                out = await out
        except ToolError as exc:
            return _error(str(exc))
        except Exception as exc:  # a tool bug must not take the session down
            return _error(f"the tool failed ({type(exc).__name__})")
        return _result(out)


def _spec(name: str, description: str, properties: dict[str, Any], required: list[str]) -> ToolSpec:
    return ToolSpec(
        name=name,
        description=description,
        parameters={"type": "object", "properties": properties, "required": required, "additionalProperties": False},
    )


def default_registry() -> ToolRegistry:
    """The built-in tools every session gets."""
    reg = ToolRegistry()
    reg.register(_spec("get_time", "Get the current local time.", {}, []), _get_time)
    reg.register(_spec("get_date", "Get today's local date and weekday.", {}, []), _get_date)
    reg.register(
        _spec(
            "calculate",
            "Evaluate an arithmetic expression with numbers, + - * / ** % and parentheses.",
            {"expression": {"type": "string", "description": "For example '12 * 7' or '(3 + 4) ** 2'."}},
            ["expression"],
        ),
        _calculate,
    )
    reg.register(
        _spec(
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
        _spec(
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
        _spec(
            "recall",
            "Look up a remembered fact by key, or all remembered facts when no key is given.",
            {"key": {"type": "string", "description": "The fact's key; omit to list everything."}},
            [],
        ),
        _recall,
    )
    return reg
