"""The native protocol's client (docs/protocol.md): JSON control, PCM16 or Opus audio."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from actors.client.base import FRAME_MS, GOODBYE, RESTARTED, ClientBase, ClientTurn, OnEvent, refused_hello
from actors.protocols.native import CODEC_OPUS, unpack_audio
from actors.protocols.opus import OpusDecoder, OpusEncoder


class NativeClient(ClientBase):
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
            raise refused_hello(reply)
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
