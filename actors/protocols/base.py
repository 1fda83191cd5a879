"""What a wire protocol adapter turns client messages into, and the interface
the connection driver (actors/connection.py) calls. Adapters know a wire
format and nothing else: no dialogue, no vendor, no Ray."""

from __future__ import annotations

import abc
import math
import re
from dataclasses import dataclass, field
from typing import Any, Union

from actors import safe_json


class ProtocolError(Exception):
    """A client message the protocol cannot accept; `fatal` closes the socket."""

    def __init__(self, code: str, message: str, fatal: bool = False, close_code: int = 4400) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.fatal = fatal
        self.close_code = close_code


SESSION_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
"""Session ids a client may name: they become actor names, log fields and
SQLite keys, so no dots, slashes, colons, blanks or control characters (the
server's own ids are 16 hex characters)."""
MAX_TEXT_CHARS = 4000
"""A typed message, as on POST /api/text/process."""
MAX_ECHO_ID_CHARS = 64
_SESSION_ID_RE = re.compile(SESSION_ID_PATTERN)
_JSON_CODES = {"json.too_large": "limit.too_large", "json.too_deep": "protocol.too_deep"}
"""safe_json codes with a protocol code of their own; the rest (syntax, bad
number, constant or string) are all `protocol.bad_json` to the client."""


def valid_session_id(value: object) -> bool:
    """True for a str matching SESSION_ID_PATTERN (fullmatch: `$` alone would
    let a trailing newline through)."""
    return isinstance(value, str) and _SESSION_ID_RE.fullmatch(value) is not None


def echo_id(value: object) -> str | int | float | None:
    """The `id` of a ping as it may be sent back: a short string or a number
    any JSON client reads exactly (finite, within ±2**53); anything else is
    answered with null rather than echoing a client's payload."""
    if isinstance(value, str):
        return value if len(value) <= MAX_ECHO_ID_CHARS else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value if abs(value) <= 2 ** 53 else None


def short_repr(value: object, limit: int = 40) -> str:
    """repr() for error messages, cut so a client cannot make us echo
    (and log) a whole message back."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def load_json_message(data: str | bytes, fatal: bool = False) -> Any:
    """safe_json.loads with its refusals as ProtocolErrors: syntax and
    unacceptable values are `protocol.bad_json`, over-size `limit.too_large`,
    over-deep `protocol.too_deep`."""
    try:
        return safe_json.loads(data)
    except safe_json.JSONLimitError as e:
        code = _JSON_CODES.get(e.code, "protocol.bad_json")
        raise ProtocolError(code, f"message refused: {e.message}", fatal=fatal) from None


def parse_json_message(data: str, expect_hello: bool = False) -> tuple[str, dict[str, Any]]:
    """Every JSON control protocol here takes an object with a string `type`,
    and `hello` before anything else; → (type, message) or the stable error.
    Errors before the hello are fatal: there is no session to keep open."""
    msg = load_json_message(data, fatal=expect_hello)
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise ProtocolError("protocol.bad_message", "a message must be a JSON object with a string 'type'",
                            fatal=expect_hello)
    if expect_hello and msg["type"] != "hello":
        raise ProtocolError("protocol.hello_required", "send 'hello' first", fatal=True)
    return msg["type"], msg


# ------------------------------------------------------------------ actions
@dataclass
class Hello:
    session_id: str | None = None
    output_sample_rate: int | None = None
    persona: str | None = None
    greet: bool = False
    """A new session says its persona's greeting first (a resumed one does not)."""
    features: dict[str, Any] = field(default_factory=dict)


@dataclass
class Audio:
    pcm16: bytes


@dataclass
class Text:
    text: str


@dataclass
class Interrupt:
    reason: str = "client"


@dataclass
class Listen:
    state: str
    mode: str = "auto"


@dataclass
class Greet:
    """A wake word was heard: the session greets the person (persona greeting)."""


@dataclass
class DeviceMessage:
    kind: str
    payload: Any


@dataclass
class Reply:
    """Answer the client directly (pong, history request, protocol errors)."""

    data: str | bytes


@dataclass
class HistoryRequest:
    pass


Action = Union[Hello, Audio, Text, Interrupt, Listen, Greet, DeviceMessage, Reply, HistoryRequest]
Outgoing = Union[str, bytes]


class ProtocolAdapter(abc.ABC):
    name: str = "protocol"

    @abc.abstractmethod
    def on_text(self, data: str) -> list[Action]:
        """A JSON text frame from the client."""

    @abc.abstractmethod
    def on_binary(self, data: bytes) -> list[Action]:
        """A binary frame from the client."""

    @abc.abstractmethod
    def hello_reply(self, session_id: str, resumed: bool, output_sample_rate: int) -> list[Outgoing]:
        """What to send once the session is open."""

    @abc.abstractmethod
    def encode(self, event: Any) -> list[Outgoing]:
        """One session event → zero or more frames for the client."""

    def error(self, code: str, message: str) -> list[Outgoing]:
        """A non-fatal error report in this protocol's own shape."""
        return [safe_json.dumps({"type": "error", "code": code, "message": message})]

    def goodbye(self, session_id: str | None, reason: str, retry_after_ms: int) -> list[Outgoing]:
        """The last message before the server closes the socket with 1012
        because this replica is shutting down (a redeploy, a scale-down):
        reconnect after about `retry_after_ms` and resume `session_id` (its
        history kept). docs/protocol.md, "Server restarts"."""
        return [safe_json.dumps({"type": "goodbye", "session_id": session_id, "reason": reason,
                                 "reconnect": True, "retry_after_ms": retry_after_ms})]

    def after_hello(self) -> list[Outgoing]:
        """Messages the server sends right after the hello reply (e.g. MCP initialize)."""
        return []

    @property
    def wants_output_rate(self) -> int | None:
        return None

    @property
    def speaks(self) -> bool:
        """False for text-only clients: the session then skips speech."""
        return True
