"""Text-only streaming socket (`/ws/text/stream`): send `{"type": "text",
"text": ...}` (optionally `"session_id"` on the first message), receive the
reply as it streams; no audio either way."""

from __future__ import annotations

from typing import Any

from actors import safe_json
from actors.protocols.base import (
    MAX_TEXT_CHARS, Action, Hello, Interrupt, Outgoing, ProtocolAdapter, ProtocolError, Reply, Text, echo_id,
    load_json_message, short_repr, valid_session_id,
)

TEXT_EVENTS = {"llm.delta", "llm.emotion", "tool.call", "tool.result", "metrics", "error"}


class TextStreamProtocol(ProtocolAdapter):
    name = "text"

    def __init__(self) -> None:
        self._opened = False

    def on_text(self, data: str) -> list[Action]:
        """The first message doubles as the hello, so its errors are fatal
        (no session is open yet), like a bad hello on the other sockets."""
        first = not self._opened
        msg = load_json_message(data, fatal=first)
        if not isinstance(msg, dict):
            raise ProtocolError("protocol.bad_message", "a message must be a JSON object", fatal=first)
        actions: list[Action] = []
        if first:
            actions.append(Hello(session_id=_session_id(msg.get("session_id"))))
            self._opened = True
        actions.append(_action(msg))
        return actions

    def on_binary(self, data: bytes) -> list[Action]:
        raise ProtocolError("protocol.no_audio", "this socket takes text only; use /ws/voice for audio")

    def hello_reply(self, session_id: str, resumed: bool, output_sample_rate: int) -> list[Outgoing]:
        return [safe_json.dumps({"type": "hello", "session_id": session_id, "resumed": resumed})]

    @property
    def speaks(self) -> bool:
        return False

    def encode(self, event: Any) -> list[Outgoing]:
        if event.type not in TEXT_EVENTS:
            return []
        return [safe_json.dumps(event.model_dump(mode="json"))]


def _session_id(value: object) -> str | None:
    """None (or absent) asks for a new session; anything else must be an id a
    client may name (base.SESSION_ID_PATTERN), since it picks the session
    actor and its stored history."""
    if value is None:
        return None
    if not valid_session_id(value):
        raise ProtocolError("protocol.bad_session_id",
                            "session_id must be 1-64 characters of A-Z, a-z, 0-9, '_' or '-'", fatal=True)
    return value  # type: ignore[return-value]


def _action(msg: dict[str, Any]) -> Action:
    """One message → one action; `type` defaults to text."""
    kind = msg.get("type", "text")
    if kind == "text":
        text = msg.get("text")
        if not isinstance(text, str) or len(text) > MAX_TEXT_CHARS:
            raise ProtocolError("protocol.bad_message",
                                f"'text' needs a string field 'text' of at most {MAX_TEXT_CHARS} characters")
        return Text(text)
    if kind == "interrupt":
        return Interrupt("client")
    if kind == "ping":
        return Reply(safe_json.dumps({"type": "pong", "id": echo_id(msg.get("id"))}))
    raise ProtocolError("protocol.unknown_type", f"unknown message type {short_repr(kind)}")
