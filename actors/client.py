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

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from actors.audio import silence, split_frames
from actors.protocols.native import CODEC_OPUS, unpack_audio
from actors.protocols.opus import OpusDecoder, OpusEncoder
from actors.protocols.xiaozhi import pack_frame, unpack_frame

FRAME_MS = 60
RESTARTED = "session.restarted"
"""The `error` code the server sends when it reopened a dead session on this socket."""
GOODBYE = "goodbye"
"""The message a draining server sends before it closes with SERVICE_RESTART."""
SERVICE_RESTART = 1012
"""WebSocket close code "service restart": reconnect (after `retry_after_ms`) and resume."""


class _Refusal(ConnectionError):
    """The server answered a socket with `reply` instead of `hello`."""

    def __init__(self, what: str, reply: dict[str, Any]) -> None:
        super().__init__(f"{what}: {reply}")
        self.reply = reply

    @property
    def retry_after_s(self) -> float:
        """The server's hint of when to come back (0 without one)."""
        return _retry_after_s(self.reply)


class ServerRestarting(_Refusal):
    """The server answered a new socket with `goodbye`: the replica it reached
    is shutting down; try again shortly (another one will take it)."""

    def __init__(self, goodbye: dict[str, Any]) -> None:
        super().__init__("server restarting", goodbye)
        self.goodbye = goodbye


class ServerBusy(_Refusal):
    """The server refused a new socket for now (`limit.starting_sessions`:
    as many new sessions as it starts at once wait already), with a hint of
    when to come back; nothing of the session exists yet."""

    BUSY_CODES = frozenset({"limit.starting_sessions"})

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__("server busy", error)


class HelloRefused(_Refusal):
    """The server answered our hello with an error (a session cap, a session
    that is not ours): trying again would get the same answer."""

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__("server refused hello", error)


def _refused_hello(reply: dict[str, Any]) -> ConnectionError:
    """What a reply other than `hello` to our hello means."""
    if reply.get("type") == GOODBYE:
        return ServerRestarting(reply)
    if reply.get("type") == "error" and reply.get("code") in ServerBusy.BUSY_CODES:
        return ServerBusy(reply)
    return HelloRefused(reply)


def closed_for_restart(error: BaseException) -> bool:
    """Did the server close this socket because it is restarting (1012)?"""
    return (isinstance(error, ServerRestarting) or
            isinstance(error, ConnectionClosed) and error.rcvd is not None and error.rcvd.code == SERVICE_RESTART)


def _retry_after_s(message: dict[str, Any] | None) -> float:
    """The server's reconnect hint (a `goodbye`'s or a refusal's), bounded so
    a bad value cannot stall us."""
    value = message.get("retry_after_ms") if message else None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 30_000:
        return value / 1000
    return 0.0


def should_reconnect(error: BaseException) -> bool:
    """Is this socket failure one to answer by reconnecting? Yes for a
    dropped connection, a server that is (re)starting (1012 after a
    `goodbye`: an upgrade) or busy starting sessions; no for a refusal (an
    `error` in answer to hello, close codes 4400–4499: auth, a session that
    is not yours, limits) or a normal close (1000: the conversation ended)."""
    if isinstance(error, (ServerRestarting, ServerBusy)):
        return True
    if isinstance(error, HelloRefused):
        return False
    if isinstance(error, ConnectionClosed):
        frame = error.rcvd
        return frame is None or not (frame.code == 1000 or 4400 <= frame.code < 4500)
    if isinstance(error, InvalidStatus):
        return error.response.status_code >= 500
    return isinstance(error, (OSError, InvalidHandshake, asyncio.TimeoutError, ConnectionError))


@dataclass
class ClientTurn:
    """What one turn looked like from the client's side of the socket."""

    transcript: str | None = None
    partials: list[str] = field(default_factory=list)
    reply: str = ""
    sentences: list[str] = field(default_factory=list)
    audio: bytes = b""
    sample_rate: int = 16000
    messages: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    interrupted: bool = False
    first_audio_at: float | None = None
    audio_done_at: float | None = None
    speech_sent_at: float | None = None
    """When the last frame of speech (before the trailing silence) was sent."""

    @property
    def end_of_speech_to_first_audio_ms(self) -> float | None:
        if self.first_audio_at is None or self.speech_sent_at is None:
            return None
        return (self.first_audio_at - self.speech_sent_at) * 1000.0


OnEvent = Callable[[dict[str, Any]], None]
C = TypeVar("C")


def server_busy(error: BaseException) -> bool:
    """A first connect's only reason to try again: the server said when."""
    return isinstance(error, ServerBusy)


async def connect_patiently(open_socket: Callable[[], Awaitable[C]], timeout_s: float = 60.0,
                            first_wait_s: float = 0.0,
                            retry: Callable[[BaseException], bool] = should_reconnect) -> C:
    """`open_socket()` until it succeeds, retrying what `retry` allows
    (`should_reconnect`: unreachable, restarting, busy; a first connect
    passes `server_busy`, so a wrong address fails at once) with jittered
    backoff, each wait at least the server's hint, until `timeout_s`; a
    refusal is raised at once."""
    deadline = time.monotonic() + timeout_s
    if first_wait_s:
        await asyncio.sleep(min(first_wait_s, max(0.0, deadline - time.monotonic())))
    delay = 0.2
    while True:
        try:
            return await asyncio.wait_for(open_socket(), max(1.0, deadline - time.monotonic()))
        except Exception as e:
            if not retry(e) or time.monotonic() + delay >= deadline:
                raise
            hint = e.retry_after_s if isinstance(e, _Refusal) else 0.0
            await asyncio.sleep(max(delay, hint) * random.uniform(0.8, 1.2))
            delay = min(2.0, delay * 2)


class _Client:
    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.hello: dict[str, Any] = {}
        self.reconnects = 0
        self.goodbye: dict[str, Any] | None = None
        """The server's last `goodbye` on this socket (it is restarting), if any."""
        self._connect_args: dict[str, Any] = {}
        self.audio_sent_ms = 0
        """Audio this client has sent, in ms: the session's `stream_ms` clock
        (its events say where in the stream they happened), if it sent all of
        the session's audio."""

    async def _connect_again(self) -> _Client:
        raise NotImplementedError

    async def reconnect(self, timeout_s: float = 60.0) -> None:
        """Open a new socket to the same session (the native client names its
        session id; a xiaozhi device gets its own session back by its
        credentials), retrying with jittered backoff while the server is
        unreachable or starting, until `timeout_s`. After a `goodbye` the
        first try waits its `retry_after_ms`, so a drained replica's clients
        spread out. A refusal (auth, not your session) is raised at once. The
        old socket is dropped."""
        fresh = await connect_patiently(self._connect_again, timeout_s, first_wait_s=_retry_after_s(self.goodbye))
        old, self.ws = self.ws, fresh.ws
        self.hello = fresh.hello
        self.goodbye = None
        self._adopt(fresh)
        self.reconnects += 1
        try:
            await old.close()
        except Exception:  # it is dead already
            pass

    def _adopt(self, fresh: Any) -> None:
        """Take the new connection's per-socket state (codecs, ids)."""

    async def close(self) -> None:
        await self.ws.close()

    async def __aenter__(self) -> _Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def stream_pcm(self, pcm16: bytes, realtime: bool = True, trailing_silence_ms: int = 1200,
                         turn: ClientTurn | None = None, lags_ms: list[float] | None = None,
                         sent: list[tuple[int, float]] | None = None) -> None:
        """Send speech as 60 ms frames, in real time unless told otherwise;
        `lags_ms` collects how late each frame left against its schedule,
        `sent` (`audio_sent_ms` after the frame, when it left) for each frame."""
        frames = split_frames(pcm16, FRAME_MS)
        tail = split_frames(silence(trailing_silence_ms), FRAME_MS)
        start = time.monotonic()
        for i, frame in enumerate(frames + tail):
            if i == len(frames) and turn is not None:
                turn.speech_sent_at = time.monotonic()
            if lags_ms is not None:
                lags_ms.append(max(0.0, (time.monotonic() - (start + i * FRAME_MS / 1000)) * 1000))
            await self._send_audio_frame(frame)
            self.audio_sent_ms += len(frame) * 1000 // (2 * 16000)
            if sent is not None:
                sent.append((self.audio_sent_ms, time.monotonic()))
            if realtime:
                delay = start + (i + 1) * FRAME_MS / 1000 - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)

    async def _send_audio_frame(self, frame: bytes) -> None:
        raise NotImplementedError


class NativeClient(_Client):
    """docs/protocol.md, version 1."""

    def __init__(self, ws: ClientConnection, opus: bool) -> None:
        super().__init__(ws)
        self._encoder = OpusEncoder(16000, FRAME_MS) if opus else None
        self._decoder: OpusDecoder | None = None

    @classmethod
    async def connect(cls, url: str, token: str | None = None, session_id: str | None = None,
                      opus: bool = False, output_opus: bool = False, output_rate: int | None = None,
                      persona: str | None = None, greet: bool = False) -> NativeClient:
        headers = {"Authorization": f"Bearer {token}"} if token else None
        ws = await connect(url, additional_headers=headers, max_size=2 ** 22, proxy=None)
        client = cls(ws, opus)
        client._connect_args = {"url": url, "token": token, "session_id": session_id, "opus": opus,
                                "output_opus": output_opus, "output_rate": output_rate, "persona": persona}
        hello: dict[str, Any] = {"type": "hello", "version": 1,
                                 "audio": {"format": "opus" if opus else "pcm16", "sample_rate": 16000,
                                           "channels": 1, "frame_ms": FRAME_MS},
                                 "output": {"format": "opus" if output_opus else "pcm16"}}
        if output_rate:
            hello["output"]["sample_rate"] = output_rate
        if session_id:
            hello["session_id"] = session_id
        if persona:
            hello["persona"] = persona
        if greet:
            hello["greet"] = True
        await ws.send(json.dumps(hello))
        reply = json.loads(await ws.recv())
        if reply.get("type") != "hello":
            await ws.close()
            raise _refused_hello(reply)
        client.hello = reply
        if output_opus:
            client._decoder = OpusDecoder(reply["audio_out"]["sample_rate"])
        return client

    @property
    def session_id(self) -> str:
        return self.hello["session_id"]

    async def _connect_again(self) -> NativeClient:
        return await NativeClient.connect(**{**self._connect_args, "session_id": self.session_id})

    def _adopt(self, fresh: Any) -> None:
        self._encoder, self._decoder = fresh._encoder, fresh._decoder

    async def _send_audio_frame(self, frame: bytes) -> None:
        if self._encoder is None:
            await self.ws.send(frame)
        else:
            for packet in self._encoder.encode(frame):
                await self.ws.send(packet)

    async def send_json(self, message: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(message))

    async def send_text(self, text: str) -> None:
        await self.send_json({"type": "text", "text": text})

    async def interrupt(self) -> None:
        await self.send_json({"type": "interrupt"})

    async def receive_turn(self, on_event: OnEvent | None = None, timeout_s: float = 60.0,
                           turn: ClientTurn | None = None, until: str = "metrics") -> ClientTurn:
        """Read until the reply's `metrics` event (or `until`) arrives."""
        turn = turn or ClientTurn()
        deadline = time.monotonic() + timeout_s
        reply_turn: int | None = None
        playing = restarted = False
        while True:
            data = await asyncio.wait_for(self.ws.recv(), max(0.01, deadline - time.monotonic()))
            if isinstance(data, bytes):
                codec, turn_id, _seq, payload = unpack_audio(data)
                if reply_turn is not None and turn_id != reply_turn:
                    continue
                if turn.first_audio_at is None:
                    turn.first_audio_at = time.monotonic()
                turn.audio += self._decoder.decode(payload) if codec == CODEC_OPUS and self._decoder else payload
                continue
            msg = json.loads(data)
            turn.messages.append(msg)
            if on_event:
                on_event(msg)
            kind = msg.get("type")
            if kind == "tts.start":
                turn.sample_rate = msg["sample_rate"]
                playing = True
            if kind == "stt.partial":
                turn.partials.append(msg["text"])
            elif kind == "stt.final":
                turn.transcript = msg["text"]
                reply_turn = msg["turn_id"]
            elif kind == "llm.delta":
                reply_turn = msg["turn_id"] if reply_turn is None else reply_turn
                turn.reply += msg["text"]
            elif kind == "tts.sentence":
                turn.sentences.append(msg["text"])
            elif kind == GOODBYE:  # the server is restarting: close 1012 follows; reconnect() resumes
                self.goodbye = msg
            elif kind == "error":
                turn.errors.append(msg)
                if msg.get("code") == RESTARTED:  # the session died: this turn ends here
                    if not playing:
                        return turn
                    restarted = True  # its tts.stop follows
            elif kind == "tts.stop":
                turn.audio_done_at = time.monotonic()
                turn.interrupted = turn.interrupted or msg["reason"] == "interrupted"
                playing = False
                if restarted:
                    return turn
            if kind == until and (reply_turn is None or msg.get("turn_id") == reply_turn):
                return turn

    async def ask_audio(self, pcm16: bytes, on_event: OnEvent | None = None, realtime: bool = True,
                        timeout_s: float = 60.0, lags_ms: list[float] | None = None) -> ClientTurn:
        turn = ClientTurn()
        receiver = asyncio.create_task(self.receive_turn(on_event, timeout_s, turn))
        await self.stream_pcm(pcm16, realtime, turn=turn, lags_ms=lags_ms)
        return await receiver

    async def ask_text(self, text: str, on_event: OnEvent | None = None, timeout_s: float = 60.0) -> ClientTurn:
        await self.send_text(text)
        return await self.receive_turn(on_event, timeout_s)


class XiaozhiClient(_Client):
    """Speaks like xiaozhi-esp32 firmware: headers, hello, listen, Opus frames."""

    def __init__(self, ws: ClientConnection, version: int) -> None:
        super().__init__(ws)
        self.version = version
        self._encoder = OpusEncoder(16000, FRAME_MS)
        self._decoder: OpusDecoder | None = None
        self.session_id = ""

    @classmethod
    async def connect(cls, url: str, token: str | None, device_id: str, client_id: str | None = None,
                      version: int = 1, mcp: bool = False) -> XiaozhiClient:
        headers = {"Protocol-Version": str(version), "Device-Id": device_id,
                   "Client-Id": client_id or str(uuid.uuid4())}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        ws = await connect(url, additional_headers=headers, max_size=2 ** 22, proxy=None)
        client = cls(ws, version)
        await ws.send(json.dumps({"type": "hello", "version": version, "transport": "websocket",
                                  "features": {"mcp": mcp},
                                  "audio_params": {"format": "opus", "sample_rate": 16000, "channels": 1,
                                                   "frame_duration": FRAME_MS}}))
        reply = json.loads(await ws.recv())
        if reply.get("type") != "hello" or reply.get("transport") != "websocket":
            await ws.close()
            raise _refused_hello(reply)
        client.hello = reply
        client.session_id = reply.get("session_id", "")
        client._connect_args = {"url": url, "token": token, "device_id": device_id, "client_id": client_id,
                                "version": version, "mcp": mcp}
        client._decoder = OpusDecoder(reply["audio_params"]["sample_rate"])
        return client

    async def _connect_again(self) -> XiaozhiClient:
        return await XiaozhiClient.connect(**self._connect_args)  # the device's credentials name its session

    def _adopt(self, fresh: Any) -> None:
        self.session_id, self._decoder = fresh.session_id, fresh._decoder
        self._encoder = OpusEncoder(16000, FRAME_MS)

    async def send_json(self, message: dict[str, Any]) -> None:
        await self.ws.send(json.dumps({"session_id": self.session_id, **message}))

    async def listen(self, state: str, mode: str = "auto") -> None:
        await self.send_json({"type": "listen", "state": state, "mode": mode})

    async def abort(self, reason: str = "user") -> None:
        await self.send_json({"type": "abort", "reason": reason})

    async def _send_audio_frame(self, frame: bytes) -> None:
        for packet in self._encoder.encode(frame):
            await self.ws.send(pack_frame(self.version, packet))

    async def receive_turn(self, on_event: OnEvent | None = None, timeout_s: float = 60.0,
                           turn: ClientTurn | None = None) -> ClientTurn:
        """Read until `tts stop` (the firmware's end of a reply)."""
        turn = turn or ClientTurn()
        assert self._decoder is not None
        turn.sample_rate = self.hello["audio_params"]["sample_rate"]
        deadline = time.monotonic() + timeout_s
        playing = False
        while True:
            data = await asyncio.wait_for(self.ws.recv(), max(0.01, deadline - time.monotonic()))
            if isinstance(data, bytes):
                _kind, payload = unpack_frame(self.version, data)
                if turn.first_audio_at is None:
                    turn.first_audio_at = time.monotonic()
                turn.audio += self._decoder.decode(payload)
                continue
            msg = json.loads(data)
            turn.messages.append(msg)
            if on_event:
                on_event(msg)
            kind, state = msg.get("type"), msg.get("state")
            if kind == "stt":
                turn.transcript = msg["text"]
            elif kind == "tts" and state == "start":
                playing = True
            elif kind == "tts" and state == "sentence_start":
                turn.sentences.append(msg["text"])
                turn.reply = " ".join(turn.sentences)
            elif kind == GOODBYE:  # the channel is being closed (1012 follows); the next wake reopens it
                self.goodbye = msg
            elif kind == "error":
                turn.errors.append(msg)
                if msg.get("code") == RESTARTED and not playing:  # the session died before replying
                    return turn
            elif kind == "tts" and state == "stop":
                turn.audio_done_at = time.monotonic()
                return turn

    async def ask_audio(self, pcm16: bytes, on_event: OnEvent | None = None, realtime: bool = True,
                        timeout_s: float = 60.0, lags_ms: list[float] | None = None) -> ClientTurn:
        await self.listen("start", "auto")
        turn = ClientTurn()
        receiver = asyncio.create_task(self.receive_turn(on_event, timeout_s, turn))
        await self.stream_pcm(pcm16, realtime, turn=turn, lags_ms=lags_ms)
        return await receiver
