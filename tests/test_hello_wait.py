"""New actors boot once the hellos being answered are out
(`SessionManager.hello_in_flight`, actors/ingress/connection.py), counted
from the client's hello: without Ray, on a scripted socket."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from actors.config import load_config
from actors.ingress.connection import VoiceConnection
from actors.ingress.limits import LimitError
from actors.protocols.native import NativeProtocol
from actors.session_manager import PendingHellos


class ScriptedSocket:
    """Gives the client messages in turn, then waits (or disconnects)."""

    def __init__(self, messages: list[dict[str, Any]], then_disconnect: bool = True) -> None:
        self._messages = list(messages)
        self._then_disconnect = then_disconnect
        self.sent: list[str | bytes] = []

    async def receive(self) -> dict[str, Any]:
        if self._messages:
            return self._messages.pop(0)
        if self._then_disconnect:
            return {"type": "websocket.disconnect"}
        await asyncio.Event().wait()  # a client that never says anything
        raise AssertionError

    async def send_text(self, data: str) -> None:
        self.sent.append(data)

    async def send_bytes(self, data: bytes) -> None:
        self.sent.append(data)

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        pass


def connection(ws: ScriptedSocket, counter: PendingHellos, open_session: Any) -> VoiceConnection:
    config = load_config(env={})
    return VoiceConnection(ws, NativeProtocol(config.session.max_frame_bytes), open_session, config,
                           hello_in_flight=counter)


async def refuse(*_: Any) -> Any:
    raise LimitError("limit.live_sessions")


async def test_a_socket_that_never_says_hello_holds_nothing_back() -> None:
    counter = PendingHellos()
    silent = asyncio.ensure_future(connection(ScriptedSocket([], then_disconnect=False), counter, refuse).serve())
    await asyncio.sleep(0.1)
    assert counter.count == 0  # the warm pool's refill and new actors do not wait for it
    silent.cancel()
    gone = connection(ScriptedSocket([]), counter, refuse)
    await gone.serve()  # left before a hello
    assert counter.count == 0


async def test_a_hello_is_counted_until_its_answer_or_the_socket_ends() -> None:
    counter = PendingHellos()
    hello = {"type": "websocket.receive", "text": json.dumps({"type": "hello"})}
    with pytest.raises(LimitError):  # refused at the open: the core answers it with an error and a close
        await connection(ScriptedSocket([hello]), counter, refuse).serve()
    assert counter.count == 0

    seen_while_opening = []

    async def open_and_note(*_: Any) -> Any:
        seen_while_opening.append(counter.count)
        raise LimitError("limit.live_sessions")

    with pytest.raises(LimitError):
        await connection(ScriptedSocket([hello]), counter, open_and_note).serve()
    assert seen_while_opening == [1] and counter.count == 0
