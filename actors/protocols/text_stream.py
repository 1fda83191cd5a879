"""Text-only streaming socket (`/ws/text/stream`): send `{"type": "text",
"text": ...}` (optionally `"session_id"` on the first message), receive the
reply as it streams; no audio either way."""

from __future__ import annotations

import json
from typing import Any

from actors.protocols.base import Action, Hello, Interrupt, Outgoing, ProtocolAdapter, ProtocolError, Reply, Text

TEXT_EVENTS = {"llm.delta", "llm.emotion", "tool.call", "tool.result", "metrics", "error"}


class TextStreamProtocol(ProtocolAdapter):
    name = "text"

    def __init__(self) -> None:
        self._opened = False

    def on_text(self, data: str) -> list[Action]:
        try:
            msg = json.loads(data)
        except json.JSONDecodeError as e:
            raise ProtocolError("protocol.bad_json", f"message is not valid JSON: {e.msg}") from None
        if not isinstance(msg, dict):
            raise ProtocolError("protocol.bad_message", "a message must be a JSON object")
        kind = msg.get("type", "text")
        actions: list[Action] = []
        if not self._opened:
            self._opened = True
            sid = msg.get("session_id")
            actions.append(Hello(session_id=sid if isinstance(sid, str) and sid else None))
        if kind == "text":
            if not isinstance(msg.get("text"), str):
                raise ProtocolError("protocol.bad_message", "'text' needs a string field 'text'")
            actions.append(Text(msg["text"]))
        elif kind == "interrupt":
            actions.append(Interrupt("client"))
        elif kind == "ping":
            actions.append(Reply(json.dumps({"type": "pong", "id": msg.get("id")})))
        else:
            raise ProtocolError("protocol.unknown_type", f"unknown message type {kind!r}")
        return actions

    def on_binary(self, data: bytes) -> list[Action]:
        raise ProtocolError("protocol.no_audio", "this socket takes text only; use /ws/voice for audio")

    def hello_reply(self, session_id: str, resumed: bool, output_sample_rate: int) -> list[Outgoing]:
        return [json.dumps({"type": "hello", "session_id": session_id, "resumed": resumed})]

    @property
    def speaks(self) -> bool:
        return False

    def encode(self, event: Any) -> list[Outgoing]:
        if event.type not in TEXT_EVENTS:
            return []
        return [json.dumps(event.model_dump(mode="json"), ensure_ascii=False)]
