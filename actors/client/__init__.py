"""A small client for a running voice-actors server, over the native protocol
or the xiaozhi protocol (Opus), as a device would talk to it.

    async with NativeClient.connect("ws://127.0.0.1:8000/ws/voice", token) as c:
        turn = await c.ask_audio(pcm16, on_event=print)

When parts of the server die (docs/architecture.md, "When parts die"): a
session actor that dies is reopened by the server on the same socket, which
sends an `error` event `session.restarted` (the turn in flight ended, the
conversation kept; `receive_turn` returns on it, or on the `tts.stop` that
follows it if a reply was playing). A socket that drops (an ingress replica
lost, a restart) is not fatal either: `reconnect()` opens a new one to the
same session, retrying until the server takes it.

An upgrade (`serve deploy` of a new version, a scale-down) drains the ingress
replica: the reply in flight finishes or is cut, then the server sends
`goodbye` (kept in `.goodbye`, with `retry_after_ms`) and closes with 1012
"service restart". That is a reconnect-and-resume too: `reconnect()` waits
the hinted time, jittered, and lands on whichever replica serves next.

A burst of new sessions beyond what the server can start at once is refused
before `hello` with an `error` carrying `retry_after_ms`
(`limit.starting_sessions`, close 4503): `ServerBusy`, which
`connect_patiently(..., retry=server_busy)` (a first connect) and
`reconnect()` answer by trying again after the hint.
"""

from actors.client.base import (
    FRAME_MS,
    GOODBYE,
    RESTARTED,
    SERVICE_RESTART,
    ClientTurn,
    HelloRefused,
    ServerBusy,
    ServerRestarting,
    closed_for_restart,
    connect_patiently,
    server_busy,
    should_reconnect,
)
from actors.client.native import NativeClient
from actors.client.xiaozhi import XiaozhiClient

__all__ = ["FRAME_MS", "GOODBYE", "RESTARTED", "SERVICE_RESTART", "ClientTurn", "HelloRefused", "NativeClient",
           "ServerBusy", "ServerRestarting", "XiaozhiClient", "closed_for_restart", "connect_patiently",
           "server_busy", "should_reconnect"]
