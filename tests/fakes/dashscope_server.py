"""A loopback fake of DashScope's duplex inference WebSocket, for tests and
the bench's fake mode.

It speaks the protocol of `/api-ws/v1/inference` as captured from the real
SDK (dashscope 2.0.2; the project's provider wire facts, §2), so the
unmodified `dashscope` SDK (Recognition for paraformer, tts_v2
SpeechSynthesizer for CosyVoice) talks to it:

* client: `run-task` (JSON), binary audio (ASR), `continue-task` with text
  (TTS), `finish-task` (with `"directive": "cancel"` to cancel TTS);
* server: `task-started`; ASR `result-generated` with interim sentences
  (`end_time: null`, `sentence_end: false`) then a final one; TTS
  `result-generated` events around binary audio frames; `task-finished` with
  a non-empty payload (the SDK needs one); or `task-failed` with
  `error_code`/`error_message` in the header, then the socket closes.

Usage::

    with FakeDashScope(api_key="test-key") as fake:     # serves in a thread
        fake.asr = AsrScript(sentences=["What is twelve times seven?"])
        fake.tts = TtsScript(ms_per_char=50)
        config = DashScopeSTTConfig(websocket_url=fake.url)
        ...
        task = fake.wait_for_task("asr")                  # what the client sent
        task.parameters, task.audio, task.cancelled, fake.connections[0].headers

Scripts are read when a task starts, so a test changes them between tasks.
Everything received is recorded (`connections`, `tasks`) for assertions;
records are plain objects appended from the server thread (safe to read
under the GIL). `python -m tests.fakes.dashscope_server` serves on a port
for manual runs and the bench.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Literal, Self

import numpy as np
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

INFERENCE_PATH = "/api-ws/v1/inference"


# ---------------------------------------------------------------- scripts
@dataclass
class Fault:
    """Something going wrong in a task.

    kind: `fail` sends task-failed (code, message) and closes the socket, like
    the service; `drop` aborts the TCP connection with no close frame; `stall`
    stops answering (audio is still recorded, finish-task ignored).
    When: `before_start` replaces task-started; otherwise after `after` audio
    frames received (ASR) or audio chunks sent (TTS); 0 = right after
    task-started.
    """

    kind: Literal["fail", "drop", "stall"] = "fail"
    after: int = 0
    before_start: bool = False
    code: str = "InternalError"
    message: str = "injected failure"


@dataclass
class AsrScript:
    """What the fake recogniser "hears", whatever audio it gets.

    Every `frames_per_result` audio frames it sends one result: up to
    `interims_per_sentence` growing interims of the current sentence, then
    (for all but the last sentence) its final. On finish-task the remaining
    sentences are sent final, then task-finished.
    """

    sentences: list[str] = field(default_factory=lambda: ["what is twelve times seven"])
    interims_per_sentence: int = 2
    frames_per_result: int = 1
    start_delay_s: float = 0.0
    """Before task-started."""
    first_result_delay_s: float = 0.0
    """Fixed latency before the first result of a task."""
    final_delay_s: float = 0.0
    """Between finish-task and the final results."""
    interims_reach_end: bool = False
    """The last interim of a sentence has all its words (without the final's
    closing punctuation), as paraformer's do once the speaker pauses."""
    fault: Fault | None = None


@dataclass
class TtsScript:
    """Audio the fake synthesiser returns: a deterministic sine tone lasting
    `ms_per_char` per character of each continue-task text, at the sample rate
    the client asked for, in chunks of `chunk_ms`."""

    ms_per_char: float = 50.0
    chunk_ms: int = 100
    tone_hz: float = 440.0
    start_delay_s: float = 0.0
    first_audio_delay_s: float = 0.0
    chunk_delay_s: float = 0.0
    """Between audio chunks (0 = as fast as the socket takes them)."""
    fault: Fault | None = None


# ---------------------------------------------------------------- records
@dataclass
class Frame:
    kind: Literal["text", "binary"]
    data: str | bytes
    at: float
    """time.monotonic() when received."""


@dataclass
class TaskRecord:
    """One task as the server saw it."""

    task_id: str
    kind: str
    """`asr` or `tts` (the run-task's payload.task)."""
    run_task: dict[str, Any]
    audio_frames: list[bytes] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    continue_payloads: list[dict[str, Any]] = field(default_factory=list)
    finish_requested: bool = False
    cancelled: bool = False
    """A finish-task with directive "cancel" arrived."""
    cancelled_at: float | None = None
    finished: bool = False
    """task-finished was sent."""
    failed: bool = False
    dropped: bool = False
    stalled: bool = False
    client_closed_early: bool = False
    """The client closed the socket before the task ended."""
    closed_at: float | None = None
    finish_requested_at: float | None = None
    """time.monotonic() when finish-task arrived (optional record; the bench's latency check)."""
    finished_at: float | None = None
    """time.monotonic() right before task-finished was sent (ASR: after the final results)."""
    chunks_sent: int = 0
    audio_sent: int = 0
    """Bytes of TTS audio sent."""
    chunk_times: list[float] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    """Every JSON event sent for this task."""

    @property
    def model(self) -> str:
        return self.run_task["payload"].get("model", "")

    @property
    def parameters(self) -> dict[str, Any]:
        return self.run_task["payload"].get("parameters", {})

    @property
    def audio(self) -> bytes:
        return b"".join(self.audio_frames)

    @property
    def ended(self) -> bool:
        return self.finished or self.failed or self.dropped or self.client_closed_early

    def chunks_sent_after(self, t: float) -> int:
        return sum(1 for c in self.chunk_times if c > t)


@dataclass
class ConnectionRecord:
    path: str
    headers: Headers
    """Handshake headers (case-insensitive lookup: `headers["authorization"]`)."""
    rejected: int | None = None
    """HTTP status when the handshake was refused."""
    frames: list[Frame] = field(default_factory=list)
    tasks: list[TaskRecord] = field(default_factory=list)
    closed: bool = False


# ---------------------------------------------------------------- server
class FakeDashScope:
    """The fake service. `start()` serves on 127.0.0.1 in a background thread
    with its own event loop (the SDK's blocking calls must never share a loop
    with it: wire facts §5)."""

    def __init__(self, api_key: str | None = None, asr: AsrScript | None = None, tts: TtsScript | None = None,
                 host: str = "127.0.0.1", port: int = 0) -> None:
        self.api_key = api_key
        """When set, handshakes without `Authorization: Bearer <api_key>` get HTTP 401."""
        self.asr = asr or AsrScript()
        self.tts = tts or TtsScript()
        self.connections: list[ConnectionRecord] = []
        self._host, self._port = host, port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: Server | None = None
        self._thread: threading.Thread | None = None
        self._stopping: asyncio.Event | None = None

    # ------------------------------------------------------------ lifecycle
    @property
    def port(self) -> int:
        assert self._server is not None, "not started"
        return self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        """What to give the SDK (`base_address=` / `url=` / `websocket_url`)."""
        return f"ws://{self._host}:{self.port}{INFERENCE_PATH}"

    def start(self) -> Self:
        ready = threading.Event()
        errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._thread_main, args=(ready, errors), name="fake-dashscope",
                                        daemon=True)
        self._thread.start()
        ready.wait(10)
        if errors:
            raise errors[0]
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reset(self, asr: AsrScript | None = None, tts: TtsScript | None = None) -> None:
        """Forget recorded traffic and restore scripts (between tests)."""
        self.connections = []
        self.asr = asr or AsrScript()
        self.tts = tts or TtsScript()

    def _thread_main(self, ready: threading.Event, errors: list[BaseException]) -> None:
        loop = self._loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._serve(ready))
        except BaseException as e:  # noqa: BLE001 - surfaced by start()
            errors.append(e)
            ready.set()
        finally:
            loop.close()

    async def _serve(self, ready: threading.Event) -> None:
        self._stopping = asyncio.Event()
        async with serve(self._handle, self._host, self._port, process_request=self._process_request,
                         compression=None, close_timeout=1, max_size=None) as server:
            self._server = server
            ready.set()
            await self._stopping.wait()

    # ------------------------------------------------------------ queries
    @property
    def tasks(self) -> list[TaskRecord]:
        return [t for c in list(self.connections) for t in list(c.tasks)]

    def last_task(self, kind: str | None = None) -> TaskRecord | None:
        found = [t for t in self.tasks if kind is None or t.kind == kind]
        return found[-1] if found else None

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
        """Poll `predicate` (blocking; from asyncio use `until`)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.005)
        return predicate()

    async def until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
        """Poll `predicate` without blocking the caller's event loop."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            await asyncio.sleep(0.005)
        return predicate()

    def wait_for_task(self, kind: str | None = None, timeout: float = 5.0) -> TaskRecord:
        assert self.wait_until(lambda: self.last_task(kind) is not None, timeout), f"no {kind or ''} task arrived"
        task = self.last_task(kind)
        assert task is not None
        return task

    # ------------------------------------------------------------ handshake
    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        record = ConnectionRecord(path=request.path, headers=Headers(request.headers))
        connection.record = record  # type: ignore[attr-defined]
        self.connections.append(record)
        if request.path.split("?")[0] != INFERENCE_PATH:
            record.rejected = 404
            return connection.respond(HTTPStatus.NOT_FOUND, "not found\n")
        if self.api_key is not None and request.headers.get("Authorization") != f"Bearer {self.api_key}":
            record.rejected = 401
            return connection.respond(HTTPStatus.UNAUTHORIZED, "Unauthorized\n")
        return None

    # ------------------------------------------------------------ connection
    async def _handle(self, ws: ServerConnection) -> None:
        record: ConnectionRecord = ws.record  # type: ignore[attr-defined]
        current: _Task | None = None
        runners: list[_Task] = []
        try:
            async for message in ws:
                now = time.monotonic()
                if isinstance(message, bytes):
                    record.frames.append(Frame("binary", message, now))
                    if current is not None:
                        current.on_audio(message)
                    continue
                record.frames.append(Frame("text", message, now))
                msg = json.loads(message)
                action = msg.get("header", {}).get("action")
                if action == "run-task":
                    current = self._start_task(ws, record, msg)
                    runners.append(current)
                elif current is not None and action == "continue-task":
                    current.on_continue(msg.get("payload", {}))
                elif current is not None and action == "finish-task":
                    current.on_finish(msg.get("payload", {}), now)
        except ConnectionClosed:
            pass
        finally:
            record.closed = True
            for task in record.tasks:
                if not task.ended:
                    task.client_closed_early = True
                    task.closed_at = time.monotonic()
            for runner in runners:
                runner.stop()

    def _start_task(self, ws: ServerConnection, record: ConnectionRecord, msg: dict[str, Any]) -> _Task:
        header, payload = msg.get("header", {}), msg.get("payload", {})
        task = TaskRecord(task_id=header.get("task_id") or uuid.uuid4().hex, kind=payload.get("task", ""),
                          run_task=msg)
        record.tasks.append(task)
        runner = _AsrTask(ws, task, self.asr) if task.kind == "asr" else _TtsTask(ws, task, self.tts)
        runner.start()
        return runner


# ---------------------------------------------------------------- tasks
_AUDIO, _FINISH, _CLOSED = "audio", "finish", "closed"


class _Task:
    """One task's server side: the connection's reader feeds `inbox`, a
    coroutine answers from it, so scripted delays never stop recording."""

    def __init__(self, ws: ServerConnection, record: TaskRecord) -> None:
        self.ws = ws
        self.record = record
        self.inbox: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._runner: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._runner = asyncio.get_running_loop().create_task(self._guarded())

    def stop(self) -> None:
        self.inbox.put_nowait((_CLOSED, None))

    def on_audio(self, data: bytes) -> None:
        self.record.audio_frames.append(data)
        self.inbox.put_nowait((_AUDIO, data))

    def on_continue(self, payload: dict[str, Any]) -> None:
        self.record.continue_payloads.append(payload)

    def on_finish(self, payload: dict[str, Any], now: float) -> None:
        if payload.get("input", {}).get("directive") == "cancel":
            self.record.cancelled = True
            self.record.cancelled_at = now
        self.record.finish_requested = True
        if self.record.finish_requested_at is None:
            self.record.finish_requested_at = now
        self.inbox.put_nowait((_FINISH, None))

    async def _guarded(self) -> None:
        try:
            await self.run()
        except ConnectionClosed:
            pass

    async def run(self) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------ sending
    async def send_event(self, event: str, payload: dict[str, Any], **header: Any) -> None:
        msg = {"header": {"task_id": self.record.task_id, "event": event, **header, "attributes": {}},
               "payload": payload}
        self.record.events.append(msg)
        await self.ws.send(json.dumps(msg, ensure_ascii=False))

    async def begin(self, start_delay_s: float, fault: Fault | None) -> bool:
        """task-started (or the fault replacing it); False when the task is over."""
        if start_delay_s:
            await asyncio.sleep(start_delay_s)
        if fault is not None and fault.before_start:
            await self.inject(fault)
            return False
        await self.send_event("task-started", {})
        if fault is not None and fault.after == 0:
            await self.inject(fault)
            return False
        return True

    async def inject(self, fault: Fault) -> None:
        if fault.kind == "fail":
            self.record.failed = True
            await self.send_event("task-failed", {}, error_code=fault.code, error_message=fault.message)
            await self.ws.close()
        elif fault.kind == "drop":
            self.record.dropped = True
            self.ws.transport.abort()
        else:
            self.record.stalled = True
            while (await self.inbox.get())[0] != _CLOSED:
                pass

    async def next_message(self) -> tuple[str, Any]:
        return await self.inbox.get()


class _AsrTask(_Task):
    def __init__(self, ws: ServerConnection, record: TaskRecord, script: AsrScript) -> None:
        super().__init__(ws, record)
        self.script = script
        self.rate = int(record.parameters.get("sample_rate") or 16000)
        self.audio_bytes = 0
        self.sentence = 0
        self.interims = 0
        self.first_result = True

    async def run(self) -> None:
        script = self.script
        if not await self.begin(script.start_delay_s, script.fault):
            return
        frames = 0
        while True:
            kind, data = await self.next_message()
            if kind == _CLOSED:
                return
            if kind == _FINISH:
                break
            frames += 1
            self.audio_bytes += len(data)
            if script.fault is not None and not script.fault.before_start and script.fault.after == frames:
                await self.inject(script.fault)
                return
            if frames % max(1, script.frames_per_result) == 0:
                await self._result_tick()
        if script.final_delay_s:
            await asyncio.sleep(script.final_delay_s)
        while self.sentence < len(script.sentences):
            await self._send_sentence(final=True)
        self.record.finished = True
        self.record.finished_at = time.monotonic()
        await self.send_event("task-finished", {"output": {}, "usage": None})

    def _ms(self) -> int:
        return int(self.audio_bytes / 2 * 1000 / self.rate)

    async def _result_tick(self) -> None:
        if self.sentence >= len(self.script.sentences):
            return
        if self.first_result and self.script.first_result_delay_s:
            await asyncio.sleep(self.script.first_result_delay_s)
        self.first_result = False
        if self.interims < self.script.interims_per_sentence:
            self.interims += 1
            await self._send_sentence(final=False)
        elif self.sentence < len(self.script.sentences) - 1:
            await self._send_sentence(final=True)

    async def _send_sentence(self, final: bool) -> None:
        text = self.script.sentences[self.sentence]
        if not final:
            whole = self.script.interims_reach_end and self.interims == self.script.interims_per_sentence
            text = text.rstrip("?.!。？！") if whole else interim_prefix(text, self.interims,
                                                                           self.script.interims_per_sentence)
        end = max(self._ms(), 1)
        sentence = {"sentence_id": self.sentence + 1, "begin_time": 0, "end_time": end if final else None,
                    "text": text, "heartbeat": False, "sentence_end": final,
                    "words": [{"begin_time": 0, "end_time": end, "text": w, "punctuation": ""}
                              for w in tokens(text)]}
        usage = {"duration": max(1, end // 1000)} if final else None
        await self.send_event("result-generated", {"output": {"sentence": sentence}, "usage": usage})
        if final:
            self.sentence += 1
            self.interims = 0


class _TtsTask(_Task):
    def __init__(self, ws: ServerConnection, record: TaskRecord, script: TtsScript) -> None:
        super().__init__(ws, record)
        self.script = script
        self.rate = int(record.parameters.get("sample_rate") or 22050)
        self.samples_sent = 0
        self.characters = 0

    def on_continue(self, payload: dict[str, Any]) -> None:
        super().on_continue(payload)
        text = payload.get("input", {}).get("text")
        if text:
            self.record.texts.append(text)
            self.inbox.put_nowait((_AUDIO, text))

    async def run(self) -> None:
        script = self.script
        if not await self.begin(script.start_delay_s, script.fault):
            return
        while True:
            kind, text = await self.next_message()
            if kind == _CLOSED:
                return
            if kind == _FINISH:
                break
            if not self.record.cancelled and not await self._speak(text):
                return
        self.record.finished = True
        self.record.finished_at = time.monotonic()
        await self.send_event("task-finished", {"usage": {"characters": self.characters}})

    async def _speak(self, text: str) -> bool:
        """One text's events and audio; False when a fault ended the task."""
        script = self.script
        self.characters += len(text)
        await self.send_event("result-generated", {"output": {"sentence": {"index": 0, "words": []},
                                                              "type": "sentence-begin", "original_text": text}})
        pcm = tone_pcm16(len(text) * script.ms_per_char, self.rate, script.tone_hz, self.samples_sent)
        step = max(2, int(self.rate * script.chunk_ms / 1000) * 2)
        for start in range(0, len(pcm), step):
            if self.record.cancelled:
                return True
            delay = script.first_audio_delay_s if self.record.chunks_sent == 0 else script.chunk_delay_s
            if delay:
                await asyncio.sleep(delay)
            if self.record.cancelled:
                return True
            chunk = pcm[start:start + step]
            await self.send_event("result-generated", {"output": {"sentence": {"index": 0, "words": []},
                                                                  "type": "sentence-synthesis"}})
            await self.ws.send(chunk)
            self.record.chunks_sent += 1
            self.record.audio_sent += len(chunk)
            self.record.chunk_times.append(time.monotonic())
            self.samples_sent += len(chunk) // 2
            fault = script.fault
            if fault is not None and not fault.before_start and fault.after == self.record.chunks_sent:
                await self.inject(fault)
                return False
        await self.send_event("result-generated", {"output": {"sentence": {"index": 0, "words": []},
                                                              "type": "sentence-end", "original_text": text},
                                                   "usage": {"characters": len(text)}})
        return True


# ---------------------------------------------------------------- helpers
def tokens(text: str) -> list[str]:
    """Words of Latin-script text, characters of Chinese text."""
    return text.split() if " " in text.strip() else [c for c in text if not c.isspace()]


def interim_prefix(text: str, k: int, n: int) -> str:
    """The k-th of n interim guesses: a growing prefix, never the whole sentence."""
    words = tokens(text)
    count = max(1, min(len(words) - 1, math.ceil(len(words) * k / (n + 1)))) if len(words) > 1 else len(words)
    return (" " if " " in text.strip() else "").join(words[:count])


def tone_pcm16(duration_ms: float, rate: int, hz: float = 440.0, start_sample: int = 0) -> bytes:
    """A sine tone as PCM16 mono; `start_sample` continues the phase across chunks."""
    n = round(rate * duration_ms / 1000)
    t = (np.arange(n) + start_sample) / rate
    return (np.sin(2 * np.pi * hz * t) * 8000).astype("<i2").tobytes()


def expected_tts_bytes(text: str, rate: int, ms_per_char: float = TtsScript.ms_per_char) -> int:
    """Bytes of audio the fake returns for `text` (one continue-task)."""
    return round(rate * len(text) * ms_per_char / 1000) * 2


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve the fake DashScope inference WebSocket.")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--api-key", default=None, help="require this key (default: accept any)")
    args = parser.parse_args()
    fake = FakeDashScope(api_key=args.api_key, port=args.port).start()
    print(fake.url, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        fake.stop()


if __name__ == "__main__":
    main()
