"""A client that speaks like xiaozhi-esp32 firmware: its headers, hello, listen and Opus frames."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from actors.client.base import FRAME_MS, GOODBYE, RESTARTED, ClientBase, ClientTurn, OnEvent, refused_hello
from actors.protocols.opus import OpusDecoder, OpusEncoder
from actors.protocols.xiaozhi import pack_frame, unpack_frame


class XiaozhiClient(ClientBase):
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
            raise refused_hello(reply)
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
