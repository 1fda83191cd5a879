"""What a wire protocol adapter turns client messages into, and the interface
the connection driver (actors/connection.py) calls. Adapters know a wire
format and nothing else: no dialogue, no vendor, no Ray."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Union


class ProtocolError(Exception):
    """A client message the protocol cannot accept; `fatal` closes the socket."""

    def __init__(self, code: str, message: str, fatal: bool = False, close_code: int = 4400) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.fatal = fatal
        self.close_code = close_code


def parse_json_message(data: str, expect_hello: bool = False) -> tuple[str, dict[str, Any]]:
    """Every JSON control protocol here takes an object with a string `type`,
    and `hello` before anything else; → (type, message) or the stable error."""
    import json

    try:
        msg = json.loads(data)
    except json.JSONDecodeError as e:
        raise ProtocolError("protocol.bad_json", f"message is not valid JSON: {e.msg}") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise ProtocolError("protocol.bad_message", "a message must be a JSON object with a string 'type'")
    if expect_hello and msg["type"] != "hello":
        raise ProtocolError("protocol.hello_required", "send 'hello' first", fatal=True)
    return msg["type"], msg


# ------------------------------------------------------------------ actions
@dataclass
class Hello:
    session_id: str | None = None
    output_sample_rate: int | None = None
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


Action = Union[Hello, Audio, Text, Interrupt, Listen, DeviceMessage, Reply, HistoryRequest]
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
        import json

        return [json.dumps({"type": "error", "code": code, "message": message})]

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
