"""The little of SessionCore that DialogueState touches, for tests that run the
dialogue's LLM and tool loop without a session."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any


class StubCore:
    def __init__(self, session_id: str = "test") -> None:
        from actors.session_core import TurnTimer

        self.session_id = session_id
        self.events: list[Any] = []
        self.errors: list[tuple[Any, str]] = []
        self.emotions: list[str] = []
        self.tts = SimpleNamespace(post=lambda message: None,
                                   note_emotion=lambda turn, emotion: self.emotions.append(emotion),
                                   quick_replies=None, safe_reply="I'd rather not talk about that.")
        self._timer = TurnTimer()

    def child_crashed(self, child: str, error: BaseException) -> None:
        raise error

    def history_changed(self) -> None:
        pass

    def emit(self, event: Any) -> None:
        self.events.append(event)

    def emit_error(self, code: Any, message: str, turn: int | None = None) -> None:
        self.errors.append((code, message))

    def timer(self, turn: int) -> Any:
        return self._timer
