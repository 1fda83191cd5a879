"""DashScope CosyVoice speech synthesis (tts_v2 `SpeechSynthesizer`) behind
the project's `TTS` contract, plus a cancellable chunk stream for barge-in.

Each text is one streaming task on one new connection: `streaming_call(text)`
then `streaming_complete()`, run on a daemon worker thread because both block
(the first call connects and waits for task-started). Audio arrives through
`on_data` on the SDK's thread and hops to the event loop. Closing the stream
early sends the service a cancel (finish-task with directive "cancel") and
closes the socket if the service does not confirm within `cancel_timeout_s`
(provider-wire-facts.md §2.2, §5).

The SDK's synthesizer reads its key only from the module attribute
`dashscope.api_key`, so it is set (under a lock, never logged) right before
each synthesizer is built.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import socket
import threading
from collections.abc import AsyncIterator
from contextlib import aclosing, suppress
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from actors.providers.base import TTS, AudioSegment, ProviderError
from actors.providers.dashscope import (
    DEFAULT_API_KEY_ENV,
    SerialWorker,
    post_to_loop,
    resolve_api_key,
    section_config,
    start_daemon,
)

log = logging.getLogger(__name__)

_KEY_LOCK = threading.Lock()
"""Guards the SDK's global `dashscope.api_key` between set and use."""


class DashScopeTTSConfig(BaseModel):
    """`tts.dashscope` in the app config."""

    model_config = ConfigDict(extra="forbid")

    model: str = "cosyvoice-v2"
    voice: str = "longxiaochun_v2"
    """Voices belong to a model generation (`*_v2` voices for cosyvoice-v2)."""
    sample_rate: Literal[8000, 16000, 22050, 24000, 44100, 48000] = 22050
    """Raw PCM16 mono at this rate (the SDK's `AudioFormat.PCM_<rate>HZ_MONO_16BIT`);
    the session resamples once per subscriber rate."""
    volume: int = Field(50, ge=0, le=100)
    speech_rate: float = Field(1.0, ge=0.5, le=2.0)
    pitch: float = Field(1.0, ge=0.5, le=2.0)
    api_key_env: str = DEFAULT_API_KEY_ENV
    api_key: SecretStr | None = None
    """Overrides the environment variable; prefer the variable."""
    websocket_url: str | None = None
    """None = the SDK's default endpoint; tests point it at a loopback fake."""
    first_audio_timeout_s: float = Field(5.0, gt=0)
    """No audio this long after the request → `tts.timeout` (connect included)."""
    timeout_s: float = Field(30.0, gt=0)
    """A whole text must be synthesised within this."""
    cancel_timeout_s: float = Field(1.0, gt=0)
    """A cancelled task waits this long for the service to confirm before its
    socket is closed (in the background: the caller never waits)."""


class DashScopeTTS(TTS):
    """Sentence synthesis on DashScope CosyVoice, one task per text."""

    label = "dashscope"

    def __init__(self, config: DashScopeTTSConfig | Any = None) -> None:
        """`config` is this provider's section, or the whole app config (the
        plug-in path builds providers as `Class(app_config)`)."""
        if not isinstance(config, DashScopeTTSConfig):
            config = section_config(config, "tts", DashScopeTTSConfig)
        self.config = config
        import dashscope.audio.tts_v2  # noqa: F401 - ~2 s: paid when the provider is built, not by the first reply

    @classmethod
    def from_app_config(cls, config: Any) -> DashScopeTTS:
        return cls(section_config(config, "tts", DashScopeTTSConfig))

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    async def synthesize(self, text: str) -> AudioSegment:
        async with aclosing(self.stream(text)) as pieces:
            audio = b"".join([piece.pcm16 async for piece in pieces])
        return AudioSegment(audio, self.config.sample_rate)

    async def stream(self, text: str) -> AsyncIterator[AudioSegment]:
        """PCM16 pieces of `text` as the service sends them.

        Close the iterator to stop (use `contextlib.aclosing`, or `break` and
        let the loop finalise it): nothing more is yielded, and the service is
        told to cancel at once, so barge-in stops within the current chunk.
        """
        if not text.strip():
            return
        key = resolve_api_key(self.config.api_key, self.config.api_key_env, "tts", "speech synthesis")
        job = _SynthesisJob(self.config, key, text)
        try:
            async for chunk in job.chunks():
                yield AudioSegment(chunk, self.config.sample_rate)
        finally:
            job.cancel()


_END = object()


class _SynthesisJob:
    """One text on one synthesizer (one task, one connection).

    Thread map: `chunks()` on the event loop; `_run` on a daemon worker;
    `on_*` callbacks on the SDK's websocket thread; `_cancel_started` on a
    short-lived daemon thread so the caller never waits for the service.
    """

    def __init__(self, config: DashScopeTTSConfig, api_key: str, text: str) -> None:
        self._config = config
        self._text = text
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._lock = threading.Lock()
        self._state: Literal["new", "starting", "started", "done", "cancelled"] = "new"
        self._synth = _new_synthesizer(config, api_key, self)
        self._worker = SerialWorker("dashscope-tts")
        self._worker.submit(self._run)
        self._worker.close()

    async def chunks(self) -> AsyncIterator[bytes]:
        """Audio until task-finished; the first error or a missed deadline raises."""
        cfg = self._config
        first_limit = min(cfg.first_audio_timeout_s, cfg.timeout_s)
        started = self._loop.time()
        got_audio = False
        while True:
            limit, what = (cfg.timeout_s, "finish") if got_audio else (first_limit, "send audio")
            try:
                item = await asyncio.wait_for(self._queue.get(), max(0.0, started + limit - self._loop.time()))
            except TimeoutError:
                raise ProviderError("tts.timeout", f"DashScope speech synthesis did not {what} "
                                                   f"within {limit:g} s") from None
            if item is _END:
                return
            if isinstance(item, ProviderError):
                raise item
            got_audio = True
            yield item

    def cancel(self) -> None:
        """Stop the task if it still runs; returns at once."""
        with self._lock:
            previous = self._state
            if previous != "done":
                self._state = "cancelled"
        if previous == "started":
            start_daemon("dashscope-tts-cancel", self._cancel_started)
        elif previous == "starting":  # the worker cancels as soon as start returns; close now so
            start_daemon("dashscope-tts-cancel", self._synth.close)  # the service hears it at once

    # ------------------------------------------------------------ worker thread
    def _run(self) -> None:
        with self._lock:
            if self._state == "cancelled":
                return
            self._state = "starting"
        try:
            self._synth.streaming_call(self._text)
        except Exception as e:  # noqa: BLE001 - reported to the consumer
            self._post(_error_from_exception(e))
            return
        with self._lock:
            cancelled = self._state == "cancelled"
            if not cancelled:
                self._state = "started"
        if cancelled:
            self._cancel_started()
            return
        try:
            self._synth.streaming_complete(complete_timeout_millis=int(self._config.timeout_s * 1000))
        except Exception as e:  # noqa: BLE001
            self._post(_error_from_exception(e))
        finally:
            with self._lock:
                if self._state == "started":
                    self._state = "done"

    def _cancel_started(self) -> None:
        try:
            self._synth.streaming_cancel(complete_timeout_millis=int(self._config.cancel_timeout_s * 1000))
        except Exception as e:  # noqa: BLE001 - finished or failed meanwhile: just make sure it is closed
            log.debug("synthesis cancel: %s", e)
            self._synth.close()

    # ------------------------------------------------------------ SDK callbacks
    def _post(self, item: Any) -> None:
        post_to_loop(self._loop, self._queue.put_nowait, item)

    def on_open(self) -> None:
        pass

    def on_event(self, message: str) -> None:
        pass

    def on_data(self, data: bytes) -> None:
        self._post(bytes(data))

    def on_complete(self) -> None:
        self._task_over()
        self._post(_END)

    def _task_over(self) -> None:
        """The task ended on the service's side: nothing left to cancel."""
        with self._lock:
            if self._state in ("starting", "started"):
                self._state = "done"

    def on_close(self) -> None:
        pass

    def on_error(self, message: Any) -> None:
        """A task-failed event, as the raw JSON text."""
        self._task_over()
        self._post(_error_from_event(message))

    def on_socket_error(self, error: Exception) -> None:
        """websocket-client error (refused, HTTP 401 at the handshake, reset):
        the SDK only logs these and would leave us waiting for a timeout."""
        self._task_over()
        status = getattr(error, "status_code", None)
        if status in (401, 403):
            self._post(ProviderError("tts.auth", f"DashScope rejected the API key (HTTP {status})"))
        else:
            self._post(ProviderError("tts.connection", f"DashScope speech synthesis connection failed: "
                                                       f"{type(error).__name__}: {error}"))

    def on_socket_closed(self) -> None:
        """The socket closed before task-finished: the connection dropped."""
        self._task_over()
        self._post(ProviderError("tts.connection", "DashScope speech synthesis connection closed mid-task"))


def _new_synthesizer(config: DashScopeTTSConfig, api_key: str, job: _SynthesisJob) -> Any:
    import dashscope
    from dashscope.audio.tts_v2 import AudioFormat

    audio_format = AudioFormat[f"PCM_{config.sample_rate}HZ_MONO_16BIT"]
    with _KEY_LOCK:
        dashscope.api_key = api_key  # the only key this class reads (wire facts §1)
        return _synthesizer_class()(
            model=config.model, voice=config.voice, format=audio_format, volume=config.volume,
            speech_rate=config.speech_rate, pitch_rate=config.pitch, callback=job, url=config.websocket_url,
            job=job,
        )


@functools.cache
def _synthesizer_class() -> type:
    """`SpeechSynthesizer` that reports socket errors and early closes.

    The SDK's own `on_error`/`on_close` (given to websocket-client) only log,
    so a refused connection, a 401 or a dropped socket would surface only as
    a timeout. Built lazily: importing the SDK costs ~2 s.
    """
    from dashscope.audio.tts_v2 import SpeechSynthesizer

    class _Synthesizer(SpeechSynthesizer):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, job: _SynthesisJob, **kwargs: Any) -> None:
            self._job = job
            super().__init__(*args, **kwargs)

        def on_error(self, ws: Any, error: Exception) -> None:
            super().on_error(ws, error)
            if not self.complete_event.is_set():
                self._job.on_socket_error(error)

        def on_close(self, ws: Any, close_status_code: Any, close_msg: Any) -> None:
            super().on_close(ws, close_status_code, close_msg)
            if not self.complete_event.is_set():
                self._job.on_socket_closed()
                self.complete_event.set()  # release a worker blocked in streaming_complete

        def close(self) -> None:
            _close_without_stranding(self)

    return _Synthesizer


def _close_without_stranding(synth: Any) -> None:
    """Close the synthesizer's socket so its reader thread ends.

    The SDK's `close()` runs websocket-client's close handshake on the calling
    thread, which reads the peer's close frame and closes the fd while the
    reader thread sits in `select()` with no timeout; epoll forgets a closed
    fd, so that thread blocks forever (seen on 7 of 40 tasks against the fake).
    Here the reader is woken by a socket shutdown instead, does its own
    teardown, and only then is the fd closed.
    """
    app = synth.ws
    conn = getattr(app, "sock", None)
    raw = getattr(conn, "sock", None)
    if app is None or conn is None or raw is None:
        return
    app.keep_running = False
    with suppress(Exception):
        if conn.connected:
            conn.send_close()
    with suppress(OSError):
        raw.shutdown(socket.SHUT_RDWR)
    reader = getattr(synth, "thread", None)
    if reader is not None and reader is not threading.current_thread():
        reader.join(1.0)
    conn.shutdown()


def _error_from_event(message: Any) -> ProviderError:
    """task-failed carries `error_code`/`error_message` in its header."""
    try:
        header = json.loads(message).get("header", {})
        code, text = header.get("error_code"), header.get("error_message")
    except (TypeError, ValueError, AttributeError):
        code, text = None, str(message)[:200]
    return ProviderError("tts.task_failed", f"DashScope speech synthesis failed: {code}: {text}")


def _error_from_exception(e: Exception) -> ProviderError:
    """Errors raised by blocking SDK calls (on the worker thread)."""
    from dashscope.common.error import RequestFailure

    if isinstance(e, RequestFailure):
        return ProviderError("tts.task_failed", f"DashScope speech synthesis failed: {e.name}: {e.message}")
    if isinstance(e, TimeoutError):
        return ProviderError("tts.timeout", f"DashScope speech synthesis timed out: {e}")
    from websocket import WebSocketException

    if isinstance(e, (ConnectionError, WebSocketException)):  # the SDK's socket library raises its own types
        return ProviderError("tts.connection", f"DashScope speech synthesis connection failed: {e}")
    return ProviderError("tts.failed", f"DashScope speech synthesis failed: {type(e).__name__}: {e}")
