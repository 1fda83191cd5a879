"""DashScope realtime speech recognition (paraformer-realtime-v2) behind the
project's `STT` contract.

One `Recognition` (one WebSocket task) per utterance: `open_stream()` starts
it at once so the connection is set up while the user is still speaking,
`push()` forwards audio as it arrives, results come out of `events()` as the
service sends them, and `end_input()` ends the task (its completion is the
`end` event with the final sentences). The SDK's callbacks run on its own threads; they hop to
the event loop with `call_soon_threadsafe`. Its blocking calls (`start`,
`stop`) run on one daemon thread per stream, in order, so audio pushed before
the task has started is queued behind `start` and sent in order
(provider-wire-facts.md §2.1, §5).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from actors.providers.base import SAMPLE_RATE, STT, ProviderError, QueuedSTTStream, SpeechEvent
from actors.providers.dashscope import DEFAULT_API_KEY_ENV, SerialWorker, post_to_loop, resolve_api_key, section_config

if TYPE_CHECKING:
    from dashscope.audio.asr import Recognition, RecognitionResult

log = logging.getLogger(__name__)

FRAME_MS = 100
"""`transcribe()` sends whole utterances in frames this long, as the docs advise."""

WEBSOCKET_ERROR_STATUS = 44
"""Status the SDK gives a server `task-failed` event (dashscope.common.constants)."""


class DashScopeSTTConfig(BaseModel):
    """`stt.dashscope` in the app config. Recognition parameters go into the
    run-task verbatim; see provider-wire-facts.md §6 for their meaning."""

    model_config = ConfigDict(extra="forbid")

    model: str = "paraformer-realtime-v2"
    sample_rate: Literal[8000, 16000] = 16000
    """Rate sent to the service; the session's 16 kHz audio is resampled for
    the 8 kHz models (paraformer-realtime-8k-v2)."""
    format: Literal["pcm"] = "pcm"
    """Sessions hold raw PCM16, so nothing else is ever sent."""
    max_sentence_silence: int = Field(800, ge=200, le=6000)
    """Server VAD silence (ms) that closes a sentence. The session's own VAD
    ends the utterance; this only splits it into punctuated sentences."""
    semantic_punctuation_enabled: bool = False
    """False = VAD segmentation: lower latency, recommended for dialogue."""
    language_hints: list[str] = ["zh", "en"]
    vocabulary_id: str | None = None
    """A hot-word list made with the DashScope vocabulary API."""
    heartbeat: bool = False
    parameters: dict[str, Any] = {}
    """Further run-task parameters passed as they are
    (e.g. `disfluency_removal_enabled`, `inverse_text_normalization_enabled`)."""
    api_key_env: str = DEFAULT_API_KEY_ENV
    api_key: SecretStr | None = None
    """Overrides the environment variable; prefer the variable."""
    websocket_url: str | None = None
    """None = the SDK's default endpoint; tests point it at a loopback fake."""
    timeout_s: float = Field(10.0, gt=0)
    """How long `finish()` waits for the final result after end of speech."""


class DashScopeSTT(STT):
    """Streaming speech recognition on DashScope paraformer-realtime."""

    label = "dashscope"

    def __init__(self, config: DashScopeSTTConfig | Any = None) -> None:
        """`config` is this provider's section, or the whole app config (the
        plug-in path `actors.providers.dashscope.stt:DashScopeSTT` builds
        providers as `Class(app_config)`)."""
        if not isinstance(config, DashScopeSTTConfig):
            config = section_config(config, "stt", DashScopeSTTConfig)
        self.config = config
        import dashscope.audio.asr  # noqa: F401 - ~2 s: paid when the provider is built, not by the first utterance

    @classmethod
    def from_app_config(cls, config: Any) -> DashScopeSTT:
        return cls(section_config(config, "stt", DashScopeSTTConfig))

    def open_stream(self, interim_every_s: float = 0.0) -> DashScopeSTTStream:
        """Start recognising now; must be called on the event loop. Interims
        come from the service as it hears them (`interim_every_s` is for
        batch decoders).

        A missing key does not raise here (the session's STT child opens
        streams outside its error handling): the stream fails, and `finish()`
        raises the ProviderError naming the variable.
        """
        try:
            key = resolve_api_key(self.config.api_key, self.config.api_key_env, "stt", "speech recognition")
        except ProviderError as e:
            return DashScopeSTTStream(self.config, None, failed=e)
        return DashScopeSTTStream(self.config, key)

    async def transcribe(self, pcm16: bytes) -> str:
        """A whole utterance, streamed in 100 ms frames."""
        stream = self.open_stream()
        frame = SAMPLE_RATE * 2 * FRAME_MS // 1000
        for start in range(0, len(pcm16), frame):
            await stream.push(pcm16[start:start + frame])
        return await stream.finish()


@dataclass
class _Sentence:
    text: str
    final: bool


class DashScopeSTTStream(QueuedSTTStream):
    """One utterance on one `Recognition` task (one WebSocket connection).

    State lives on the event loop; SDK threads only post to it. Each service
    result becomes an `interim` or `final` event (the words so far), the
    task's completion the `end` event; a failure is raised by `events()` as
    soon as the service reports it, so a fallback can take over while the
    user is still speaking. Audio pushed after a failure is dropped.
    """

    live = True
    """Interim sentences arrive from the service."""

    def __init__(self, config: DashScopeSTTConfig, api_key: str | None, failed: ProviderError | None = None) -> None:
        super().__init__()
        self._config = config
        self._loop = asyncio.get_running_loop()
        self._sentences: dict[int, _Sentence] = {}
        self._said = ""
        self._closed = False
        self._deadline: asyncio.TimerHandle | None = None
        self._recognition: Recognition | None = None
        self._worker: SerialWorker | None = None
        if failed is not None or api_key is None:
            self._put_error(failed or ProviderError("stt.failed", "DashScope speech recognition has no API key"))
            return
        self._recognition = self._new_recognition(api_key)
        self._worker = SerialWorker("dashscope-stt")
        self._worker.submit(self._start)

    # ------------------------------------------------------------ contract
    async def push(self, pcm16: bytes) -> None:
        """Queue audio for sending; returns at once (sending never waits for
        the connection, the SDK buffers frames until the task has started)."""
        if self._closed or self.over or not pcm16 or self._worker is None:
            return
        if self._config.sample_rate != SAMPLE_RATE:
            from actors.audio import resample_pcm16

            pcm16 = resample_pcm16(pcm16, SAMPLE_RATE, self._config.sample_rate)
        self._worker.submit(self._send, pcm16)

    async def end_input(self) -> None:
        """Send finish-task; the final sentences must come within `timeout_s`."""
        if self._closed or self.over:
            return
        self._shutdown()
        self._deadline = self._loop.call_later(self._config.timeout_s, self._timed_out)

    async def cancel(self) -> None:
        """Stop the task without waiting for its results (barge-in, hang-up)."""
        self._shutdown()
        self._put_closed()
        self._clear_deadline()

    def _timed_out(self) -> None:
        self._put_error(ProviderError(
            "stt.timeout", f"DashScope speech recognition gave no final result within {self._config.timeout_s:g} s"))

    def _clear_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    # ------------------------------------------------------------ SDK side
    def _new_recognition(self, api_key: str) -> Recognition:
        from dashscope.audio.asr import Recognition

        cfg = self._config
        params: dict[str, Any] = {
            "semantic_punctuation_enabled": cfg.semantic_punctuation_enabled,
            "max_sentence_silence": cfg.max_sentence_silence,
            "heartbeat": cfg.heartbeat,
        }
        if cfg.language_hints:
            params["language_hints"] = list(cfg.language_hints)
        if cfg.vocabulary_id:
            params["vocabulary_id"] = cfg.vocabulary_id
        params.update(cfg.parameters)
        if cfg.websocket_url:  # per object: the SDK read its default URL at import time
            params["base_address"] = cfg.websocket_url
        return Recognition(model=cfg.model, callback=_Callbacks(self), format=cfg.format,
                           sample_rate=cfg.sample_rate, api_key=api_key, **params)

    def _start(self) -> None:
        """Worker thread: spawn the SDK's connection thread (returns at once)."""
        assert self._recognition is not None
        try:
            self._recognition.start()
        except Exception as e:  # noqa: BLE001 - reported as the stream's error
            post_to_loop(self._loop, self._fail, _error_from_exception(e))

    def _send(self, pcm16: bytes) -> None:
        """Worker thread: a queue put in the SDK; raises only once it has stopped."""
        assert self._recognition is not None
        try:
            self._recognition.send_audio_frame(pcm16)
        except Exception as e:  # noqa: BLE001 - on_error has reported the cause already
            log.debug("dropped an audio frame: %s", e)

    def _stop(self) -> None:
        """Worker thread: finish-task, then block until task-finished."""
        assert self._recognition is not None
        try:
            self._recognition.stop()
        except Exception as e:  # noqa: BLE001 - stopped already (after an error)
            log.debug("recognition stop: %s", e)
        self._cancel_silence_timer()

    def _cancel_silence_timer(self) -> None:
        """After `on_error` the SDK leaves its 23 s non-daemon silence Timer
        running, which keeps the process alive that long (wire facts §5)."""
        timer = getattr(self._recognition, "_silence_timer", None)
        if timer is not None:
            timer.cancel()

    def _shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._worker is not None:
            self._worker.submit(self._stop)
            self._worker.close()

    # ------------------------------------------------------------ loop side
    def _on_sentence(self, sentence: dict[str, Any]) -> None:
        from dashscope.audio.asr import RecognitionResult

        text = sentence.get("text") or ""
        final = bool(sentence.get("sentence_end")) or RecognitionResult.is_sentence_end(sentence)
        key = sentence.get("sentence_id")
        key = key if isinstance(key, int) else len(self._sentences) + 1
        self._sentences[key] = _Sentence(text, final)
        words = self._text()
        if words and (final or words != self._said):
            self._said = words
            self._put(SpeechEvent("final" if final else "interim", words))

    def _on_complete(self) -> None:
        if any(not s.final for s in self._sentences.values()):
            log.debug("the service closed the task with an unfinished sentence; keeping its interim text")
        self._clear_deadline()
        self._put(SpeechEvent("end", self._text()))

    def _fail(self, error: ProviderError) -> None:
        self._cancel_silence_timer()
        self._clear_deadline()
        self._put_error(error)
        self._shutdown()

    def _text(self) -> str:
        """Sentences in order, each final or its latest interim. A sentence the
        service never closed still counts in the final text: losing the user's
        last words is worse than an unpunctuated tail."""
        return join_sentences([s.text for _, s in sorted(self._sentences.items())])


class _Callbacks:
    """`RecognitionCallback` (duck-typed so this module imports without the
    SDK). Runs on SDK threads: it only copies data and posts to the loop."""

    def __init__(self, stream: DashScopeSTTStream) -> None:
        self._stream = stream

    def on_open(self) -> None:
        pass

    def on_close(self) -> None:
        pass

    def on_event(self, result: RecognitionResult) -> None:
        sentence = result.get_sentence()
        if isinstance(sentence, dict):
            post_to_loop(self._stream._loop, self._stream._on_sentence, dict(sentence))

    def on_complete(self) -> None:
        post_to_loop(self._stream._loop, self._stream._on_complete)

    def on_error(self, result: RecognitionResult) -> None:
        self._stream._cancel_silence_timer()
        error = _error_from_result(result.status_code, result.code, result.message)
        post_to_loop(self._stream._loop, self._stream._fail, error)


def _error_from_result(status: Any, code: Any, message: Any) -> ProviderError:
    """SDK error result → stable code. The SDK reports a server task-failed
    as status 44 with the service's code; a refused handshake as the HTTP
    status; a dropped or refused connection as status -1."""
    if status in (401, 403):
        return ProviderError("stt.auth", f"DashScope rejected the API key (HTTP {status})")
    if status == WEBSOCKET_ERROR_STATUS:
        return ProviderError("stt.task_failed", f"DashScope speech recognition failed: {code}: {message}")
    if code in ("ClientConnectorError", "Unknown") or status == -1:
        return ProviderError("stt.connection", f"DashScope speech recognition connection failed: {message}")
    return ProviderError("stt.failed", f"DashScope speech recognition failed ({status} {code}): {message}")


def _error_from_exception(e: Exception) -> ProviderError:
    return ProviderError("stt.failed", f"DashScope speech recognition could not start: {type(e).__name__}: {e}")


def join_sentences(texts: list[str]) -> str:
    """Join recognised sentences: a space between Latin-script sentences,
    nothing between Chinese ones ("Hi." + "你好。" → "Hi.你好。")."""
    out = ""
    for text in (t.strip() for t in texts):
        if not text:
            continue
        if out and out[-1].isascii() and text[0].isascii():
            out += " "
        out += text
    return out
