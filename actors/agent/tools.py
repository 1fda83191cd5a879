"""The one shared tool registry, and each session's view of it (the built-in
tools themselves: actors/agent/builtin_tools.py).

The local dialogue engine and a cloud LLM see the same tools (as OpenAI-style
function schemas from `specs()`), so a tool behaves identically whichever
"brain" asked for it. Tools return JSON strings and never raise: a model can
read an `{"error": ...}` result and say something sensible, while an
exception would end the user's turn with nothing said. The one exception is
cancellation: an interrupted turn cancels its running tool calls.

Two layers: `ToolRegistry` holds tools every session shares (built-ins, MCP
servers' tools); `SessionTools` adds what belongs to one session only (the
tools of the xiaozhi device on its socket) and applies the per-call timeout.
Tools whose hook a session does not provide (knowledge search, long-term
memory, reminders, ending the conversation) are hidden from that session.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from actors.providers.base import ToolCall, ToolSpec

log = logging.getLogger(__name__)

MAX_PENDING_REMINDERS = 20
"""Bounds what one chatty session can make a long-lived actor hold."""
MAX_RESULT_CHARS = 8000
"""A tool result goes into every later LLM request of the conversation."""
MAX_TOOL_ROUNDS = 3
TOOL_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
"""OpenAI's rule for function names."""


# ------------------------------------------------------------------ config
class MCPServerConfig(BaseModel):
    """One MCP server whose tools every session is offered (`tools.mcp_servers`)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,24}$")
    """Prefix of its tools' names for the LLM: `<name>__<tool>`."""
    transport: Literal["stdio", "http"] = "stdio"
    command: str | None = None
    """stdio: the executable (with `args`, `env`, `cwd`)."""
    args: list[str] = Field(default_factory=list, max_length=64)
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str | None = None
    url: str | None = None
    """http: the streamable-HTTP endpoint (with `headers`)."""
    headers: dict[str, str] = Field(default_factory=dict)
    allowed_tools: list[str] | None = None
    """Only these of its tools (by the server's own names); None: all."""
    timeout_s: float = Field(default=10.0, gt=0, le=120)
    """Connecting and listing; a call is bounded by `tools.call_timeout_s` too."""
    max_tools: int = Field(default=32, ge=1, le=128)

    @model_validator(mode="after")
    def _transport_fields(self) -> MCPServerConfig:
        if self.transport == "stdio" and not self.command:
            raise ValueError(f"MCP server {self.name!r}: stdio needs 'command'")
        if self.transport == "http" and not (self.url or "").startswith(("http://", "https://")):
            raise ValueError(f"MCP server {self.name!r}: http needs an http(s) 'url'")
        return self


class ToolsConfig(BaseModel):
    """The `tools` section of the app config."""

    model_config = ConfigDict(extra="forbid")

    timezone: str | None = None
    """IANA zone for time, date and reminders (e.g. 'Asia/Shanghai'); None: the machine's."""
    call_timeout_s: float = Field(default=10.0, gt=0, le=300)
    max_rounds: int = Field(default=MAX_TOOL_ROUNDS, ge=0, le=10)
    """Tool rounds per turn; the round after the last is offered no tools, so the model must answer."""
    mcp_servers: list[MCPServerConfig] = Field(default_factory=list, max_length=16)
    max_device_tools: int = Field(default=64, ge=0, le=256)

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if len(value) > 64:
            raise ValueError("timezone name too long")
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown IANA time zone {value!r}") from None
        return value

    @model_validator(mode="after")
    def _unique_servers(self) -> ToolsConfig:
        names = [s.name for s in self.mcp_servers]
        if len(names) != len(set(names)) or "device" in names:
            raise ValueError("MCP server names must be unique and not 'device'")
        return self


def clock(timezone: str | None) -> Callable[[], datetime]:
    """`now()` in the configured zone (aware), or the machine's local zone."""
    if timezone is None:
        return _local_now
    zone = ZoneInfo(timezone)
    return lambda: datetime.now(zone)


def _local_now() -> datetime:
    return datetime.now().astimezone()


# ----------------------------------------------------------------- context
class Reminders:
    """Speech scheduled for later (timers, reminders) in one session; bounded,
    and cancelled with the session."""

    def __init__(self) -> None:
        self._handles: list[asyncio.TimerHandle] = []

    def schedule(self, delay_s: float, text: str, say: Callable[[str], object]) -> None:
        self._handles = [h for h in self._handles if not h.cancelled() and h.when() > _loop_time()]
        if len(self._handles) >= MAX_PENDING_REMINDERS:
            raise ToolError(f"at most {MAX_PENDING_REMINDERS} timers and reminders can wait at once")
        self._handles.append(asyncio.get_running_loop().call_later(delay_s, say, text))

    @property
    def pending(self) -> int:
        return sum(1 for h in self._handles if not h.cancelled() and h.when() > _loop_time())

    def cancel_all(self) -> None:
        for h in self._handles:
            h.cancel()
        self._handles.clear()


def _loop_time() -> float:
    return asyncio.get_running_loop().time()


MaybeAwaitable = Any  # T | Awaitable[T]: hooks may be sync or async


@dataclass
class ToolContext:
    """Per-session state and hooks a tool may use.

    Tools live in one shared registry, so anything session-specific comes in
    here rather than living on the tool. A hook left None hides the tools
    that need it; tests inject a fixed clock through `now`."""

    memory: dict[str, str] = field(default_factory=dict)
    schedule_timer: Callable[[float, str], None] | None = None
    """Replaces the spoken timer (tests record timers through it); a session
    leaves it None, so its timers share the reminders' cap and die with it."""
    now: Callable[[], datetime] = _local_now
    say: Callable[[str], object] | None = None
    """Speak unprompted (the session's `say`): timers and reminders."""
    end_conversation: Callable[[], None] | None = None
    """End the session once the reply in progress (the goodbye) has been spoken."""
    knowledge_search: Callable[[str, int], MaybeAwaitable] | None = None
    """(query, limit) → list of passages (str or JSON-able dicts)."""
    memory_save: Callable[[str], MaybeAwaitable] | None = None
    """Long-term memory across sessions: store one fact (text)."""
    memory_recall: Callable[[str, int], MaybeAwaitable] | None = None
    """(query, limit) → list of remembered facts."""
    reminders: Reminders = field(default_factory=Reminders)


class ToolError(Exception):
    """Raised by a tool for a problem the user should hear about."""


ToolFn = Callable[[dict[str, Any], ToolContext], Awaitable[Any] | Any]


@dataclass
class _Tool:
    spec: ToolSpec
    fn: ToolFn
    requires: Callable[[ToolContext], bool] | None = None


def _result(payload: Any) -> str:
    if isinstance(payload, str):  # already a result (an MCP server's text)
        text = payload
    else:
        text = json.dumps(payload, ensure_ascii=False, default=str)
    if len(text) > MAX_RESULT_CHARS:
        if isinstance(payload, str):
            return text[:MAX_RESULT_CHARS] + "…"
        return _error("the tool's result was too large")
    return text


def _error(message: str) -> str:
    return json.dumps({"error": message}, ensure_ascii=False)


async def maybe_await(value: Any) -> Any:
    return await value if isinstance(value, Awaitable) else value


# ------------------------------------------------------------- arguments
_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "number": (int, float),
    "integer": (int,),
    "boolean": (bool,),
    "array": (list,),
    "object": (dict,),
}


def _check_arguments(spec: ToolSpec, args: Any) -> str | None:
    """A small subset of JSON Schema: enough to reject what models get wrong
    (missing keys, a number sent as text), without a validator dependency."""
    if not isinstance(args, dict):
        return "arguments must be a JSON object"
    props = spec.parameters.get("properties", {})
    props = props if isinstance(props, dict) else {}
    required = spec.parameters.get("required", [])
    for name in required if isinstance(required, list) else []:
        if name not in args or args[name] is None:
            return f"missing required argument '{name}'"
    for name, value in args.items():
        if name not in props:
            return f"unexpected argument '{str(name)[:40]}'"
        if value is None:
            continue
        prop = props[name] if isinstance(props[name], dict) else {}
        kind = prop.get("type", "")
        expected = _JSON_TYPES.get(kind) if isinstance(kind, str) else None
        # bool is an int subclass in Python, but never a number in JSON.
        if expected and (not isinstance(value, expected) or (isinstance(value, bool) and bool not in expected)):
            return f"argument '{name}' must be a {kind}"
    return None


# -------------------------------------------------------------- registry
class ToolRegistry:
    """Name → tool; the single place a tool call becomes a result."""

    max_rounds: int = MAX_TOOL_ROUNDS
    call_timeout_s: float | None = None

    def __init__(self) -> None:
        self._tools: dict[str, _Tool] = {}

    def register(self, spec: ToolSpec, fn: ToolFn, requires: Callable[[ToolContext], bool] | None = None) -> None:
        """`requires`: offered only to contexts it accepts (a hook is provided)."""
        if not TOOL_NAME_RE.match(spec.name):
            raise ValueError(f"tool name {spec.name!r} breaks OpenAI's rules")
        self._tools[spec.name] = _Tool(spec, fn, requires)

    def unregister(self, name: str) -> None:
        self._tools.pop(name, None)

    def names(self, ctx: ToolContext | None = None) -> list[str]:
        return [s.name for s in self.specs(ctx)]

    def specs(self, ctx: ToolContext | None = None) -> list[ToolSpec]:
        """The tools offered to `ctx` (without one: those that need no hook)."""
        return [t.spec for t in self._tools.values() if t.requires is None or (ctx is not None and t.requires(ctx))]

    def _find(self, name: str, ctx: ToolContext) -> _Tool | None:
        tool = self._tools.get(name)
        if tool is None or (tool.requires is not None and not tool.requires(ctx)):
            return None
        return tool

    async def prepare(self) -> None:
        """Load tools that come from elsewhere (MCP servers); none here."""

    async def run(self, call: ToolCall, ctx: ToolContext, timeout_s: float | None = None) -> str:
        """Run one call; every failure (a timeout too) becomes an `{"error":
        ...}` result so the model can explain it instead of the turn dying.
        Cancellation (the turn was interrupted) is not a failure: it propagates."""
        tool = self._find(call.name, ctx)
        if tool is None:
            return _error(f"unknown tool '{call.name[:64]}'")
        problem = _check_arguments(tool.spec, call.arguments)
        if problem:
            return _error(problem)
        timeout_s = timeout_s if timeout_s is not None else self.call_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                out = await maybe_await(tool.fn(dict(call.arguments), ctx))
        except ToolError as exc:
            return _error(str(exc)[:500])
        except TimeoutError:
            return _error("the tool did not answer in time" if timeout_s is None
                          else f"the tool did not answer within {timeout_s:g} s")
        except Exception as exc:  # a tool bug must not take the session down
            log.warning("tool %s failed", call.name, exc_info=True)
            return _error(f"the tool failed ({type(exc).__name__})")
        return _result(out)


class ToolSource(Protocol):
    """Tools that live elsewhere (MCP servers): listed once, called by name."""

    async def specs(self) -> list[ToolSpec]: ...
    async def call(self, name: str, arguments: dict[str, Any], timeout_s: float) -> str: ...


class SessionTools(ToolRegistry):
    """One session's tools: the shared registry's (those whose hooks this
    session's context provides), the remote source's (MCP servers, loaded on
    the first turn), and its own (the device's tools), which shadow nothing:
    a session tool never replaces a shared one of the same name."""

    def __init__(self, shared: ToolRegistry, ctx: ToolContext, config: ToolsConfig | None = None,
                 remote: ToolSource | None = None) -> None:
        super().__init__()
        cfg = config or ToolsConfig()
        self.shared = shared
        self.ctx = ctx
        self.max_rounds = cfg.max_rounds
        self.call_timeout_s = cfg.call_timeout_s
        self._remote = remote
        self._remote_names: set[str] = set()
        self._loaded = remote is None
        self._next_try = 0.0
        self._lock = asyncio.Lock()

    def specs(self, ctx: ToolContext | None = None) -> list[ToolSpec]:
        shared = self.shared.specs(ctx or self.ctx)
        taken = {s.name for s in shared}
        return shared + [t.spec for t in self._tools.values() if t.spec.name not in taken]

    def _find(self, name: str, ctx: ToolContext) -> _Tool | None:
        return self.shared._find(name, ctx) or super()._find(name, ctx)

    async def run(self, call: ToolCall, ctx: ToolContext | None = None, timeout_s: float | None = None) -> str:
        return await super().run(call, ctx or self.ctx, timeout_s)

    def replace(self, prefix: str, tools: list[tuple[ToolSpec, ToolFn]]) -> None:
        """Swap every session tool named `prefix…` for `tools` (a fresh listing)."""
        for name in [n for n in self._tools if n.startswith(prefix)]:
            del self._tools[name]
        for spec, fn in tools:
            self.register(spec, fn)

    async def prepare(self, wait_s: float = 5.0) -> None:
        """List the remote source's tools once (bounded wait); after a failure
        try again at most every 30 s, so a dead MCP server costs one turn a
        delay, not every turn."""
        if self._loaded or self._remote is None:
            return
        loop = asyncio.get_running_loop()
        if loop.time() < self._next_try:
            return
        async with self._lock:
            if self._loaded:
                return
            remote = self._remote
            try:
                async with asyncio.timeout(wait_s):
                    specs = await remote.specs()
            except Exception as e:
                log.warning("MCP tools could not be listed: %r", e)
                self._next_try = loop.time() + 30.0
                return
            for spec in specs:
                async def call(args: dict[str, Any], ctx: ToolContext, _name: str = spec.name) -> str:
                    return await remote.call(_name, args, self.call_timeout_s)
                if TOOL_NAME_RE.match(spec.name):
                    self.register(spec, call)
            self._loaded = True
