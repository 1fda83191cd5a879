"""The session's logic without Ray: children, turns, interruption, events.

`SessionActor` (session.py) wraps this in a Ray actor; benchmarks drive it
directly in one process as the no-Ray baseline, so both run the same code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from actors.agent.builtin_tools import default_registry
from actors.agent.device_tools import DeviceTools
from actors.agent.knowledge import format_hits
from actors.agent.mcp import mcp_source
from actors.agent.memory import MemoryStore
from actors.agent.moderation import build_moderator, safe_reply_for
from actors.agent.persona import Persona
from actors.agent.quick_replies import build_quick_replies
from actors.agent.tools import SessionTools, ToolContext, ToolRegistry, ToolsConfig, clock
from actors.audio_buffer import AudioBatch, AudioBuffer, ClientsGone, ListenControl, WordsEndASentence
from actors.config import AppConfig
from actors.dialogue import AssistantSays, DialogueState, UserTurn
from actors.events import (
    DeviceRequest,
    ErrorCode,
    ErrorEvent,
    Event,
    SessionStarted,
    SpeechEnd,
    SpeechStart,
    STTFinal,
    TurnMetrics,
)
from actors.history_store import HistoryStore
from actors.mailbox import Message
from actors.providers.base import LLM, SAMPLE_RATE, STT, TTS, VAD, ChatMessage
from actors.stt_stream import STTStream
from actors.text import ends_a_sentence
from actors.tts import OutputPrefs, TTSChild

log = logging.getLogger(__name__)

MAX_TEXT_CHARS = 4000


@dataclass(frozen=True)
class _Output:
    """A subscriber's output preferences with the session's defaults filled in."""

    sample_rate: int
    speak: bool
    pace: bool


@dataclass
class TurnTimer:
    """Wall-clock marks of one turn, turned into the `metrics` event."""

    speech_end: float | None = None
    text_in: float | None = None
    stt_final: float | None = None
    llm_start: float | None = None
    llm_first: float | None = None
    first_sentence: float | None = None
    first_audio: float | None = None
    llm_usage: dict[str, int] | None = None
    preemptive: bool = False

    def add_usage(self, usage: dict[str, int]) -> None:
        total = self.llm_usage or {}
        self.llm_usage = {k: total.get(k, 0) + v for k, v in usage.items() if isinstance(v, int)}

    def to_event(self, turn: int, interrupted: bool) -> TurnMetrics:
        def ms(a: float | None, b: float | None) -> float | None:
            return None if a is None or b is None else round((b - a) * 1000.0, 1)

        return TurnMetrics(
            turn_id=turn, interrupted=interrupted,
            stt_final_ms=ms(self.speech_end, self.stt_final),
            llm_first_token_ms=ms(self.llm_start, self.llm_first),
            tts_first_audio_ms=ms(self.first_sentence, self.first_audio),
            first_audio_ms=ms(self.speech_end or self.text_in, self.first_audio),
            llm_usage=self.llm_usage, llm_preemptive=self.preemptive,
        )


class SessionCore:
    def __init__(self, session_id: str, config: AppConfig, *, vad: VAD, stt: STT, llm: LLM, tts: TTS,
                 tools: ToolRegistry | None = None, provider_names: dict[str, str] | None = None,
                 history: list[ChatMessage] | None = None, memory: dict[str, str] | None = None,
                 store: HistoryStore | None = None, summary: str = "") -> None:
        """`config` is the session's own: its persona is `config.persona()`
        (agent/persona.py `persona_config`)."""
        self.session_id = session_id
        self.config = config
        self.provider_names = provider_names or {}
        self._providers: dict[str, Any] = {"stt": stt, "llm": llm, "tts": tts}
        self._subscribers: dict[asyncio.Queue[Event], _Output] = {}
        self.dropped_events = 0
        self.turn_id = 0
        self.reply_turn: int | None = None
        """The turn whose reply is being thought of or spoken, if any."""
        self.interrupt_stream_ms: int | None = None
        self._timers: dict[int, TurnTimer] = {}
        tools_cfg: ToolsConfig = getattr(config, "tools", None) or ToolsConfig()
        self.tool_context = ToolContext(memory=dict(memory or {}),
                                        now=clock(tools_cfg.timezone), say=self._say_if_open,
                                        end_conversation=self._end_after_reply)
        self.tools = SessionTools(tools or default_registry(), self.tool_context, tools_cfg,
                                  mcp_source(tools_cfg, config.server.namespace))
        self.device_tools = DeviceTools(self.tools, self._device_request, timeout_s=tools_cfg.call_timeout_s,
                                        max_tools=tools_cfg.max_device_tools)
        self._ending: asyncio.Task[None] | None = None
        self.vad = vad
        self.audio = AudioBuffer(self, vad, config)
        self.stt = STTStream(self, stt, config.stt.partial_interval_ms, config.stt.decode_at_pause)
        self.dialogue = DialogueState(self, llm, self.tools, self.tool_context,
                                      config.persona(), config.session.max_history_messages, history,
                                      llm_config=config.llm, summary=summary)
        persona = config.persona()
        self.moderator = build_moderator(config)
        self.tts = TTSChild(self, tts, config.tts, moderator=self.moderator,
                            quick_replies=build_quick_replies(config, persona),
                            safe_reply=safe_reply_for(persona, self.moderator))
        self.dialogue.moderator = self.moderator
        self._children = [self.audio, self.stt, self.dialogue, self.tts]
        self.last_activity = time.monotonic()
        self.closed = False
        self.device_state: dict[str, Any] = {}
        self._store = store
        self._history_dirty = False
        self._saver: asyncio.Task[None] | None = None

    def start(self) -> None:
        for child in self._children:
            child.start()

    # ------------------------------------------------------------ events
    def subscribe(self, output: OutputPrefs | None = None) -> asyncio.Queue[Event]:
        """A new event queue. `output` is this subscriber's own output
        (rate, speech, pacing); unset fields take the session's defaults."""
        out = self._resolve(output or OutputPrefs())
        q: asyncio.Queue[Event] = asyncio.Queue(maxsize=self.config.session.event_queue_size)
        q.put_nowait(SessionStarted(
            session_id=self.session_id, turn_id=self.turn_id, input_sample_rate=SAMPLE_RATE,
            output_sample_rate=out.sample_rate,
            persona=self.dialogue.persona.name, persona_id=self.dialogue.persona.id, providers=self.provider_names))
        self._subscribers[q] = out
        return q

    def _resolve(self, prefs: OutputPrefs) -> _Output:
        return _Output(
            sample_rate=prefs.sample_rate or self.config.session.output_sample_rate,
            speak=True if prefs.speak is None else prefs.speak,
            pace=self.config.tts.pace if prefs.pace is None else prefs.pace,
        )

    CLIENT_GONE_GRACE_S = 5.0
    """After the last client left in the middle of an utterance, how long its
    words wait for it (a device whose link blinks reconnects and speaks on)
    before they end the utterance (`ClientsGone`)."""

    def unsubscribe(self, q: asyncio.Queue[Event]) -> None:
        if self._subscribers.pop(q, None) is not None:
            self.last_activity = time.monotonic()  # the orphan clock starts when the last client leaves
            if not self._subscribers:
                with contextlib.suppress(RuntimeError):  # no loop: the stream was collected, not closed
                    asyncio.get_running_loop().call_later(self.CLIENT_GONE_GRACE_S, self._after_clients_gone)

    def _after_clients_gone(self) -> None:
        if not self._subscribers and not self.closed:
            self.audio.post(ClientsGone(None))

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    @property
    def wants_speech(self) -> bool:
        """Some subscriber wants to hear replies: only then is speech synthesised."""
        return any(out.speak for out in self._subscribers.values())

    @property
    def paced(self) -> bool:
        """Audio goes out in real time while any speaking subscriber wants it
        (barge-in must cut what a listener has not heard); an unpaced
        subscriber (HTTP) gets the reply at once only when it is alone."""
        return any(out.speak and out.pace for out in self._subscribers.values())

    @property
    def replying(self) -> bool:
        """A reply is being thought of or spoken (barge-in must then last
        `vad.min_interruption_ms`)."""
        return self.reply_turn is not None

    def emit(self, event: Any) -> None:
        event.session_id = self.session_id
        for q in self._subscribers:
            self._put(q, event)

    def emit_per_rate(self, make: Callable[[int], Any], speakers_only: bool = False) -> None:
        """An event that depends on the output rate (audio, `tts.start`):
        made once per distinct rate and shared by every subscriber at that
        rate, so audio is resampled once per rate, not once per subscriber.
        `speakers_only` leaves out text-only subscribers."""
        made: dict[int, Any] = {}
        for q, out in self._subscribers.items():
            if speakers_only and not out.speak:
                continue
            event = made.get(out.sample_rate)
            if event is None:
                event = made[out.sample_rate] = make(out.sample_rate)
                event.session_id = self.session_id
            self._put(q, event)

    def _put(self, q: asyncio.Queue[Event], event: Any) -> None:
        if q.full():  # a stalled reader must not stall the session
            self.dropped_events += 1
        else:
            q.put_nowait(event)

    def emit_error(self, code: ErrorCode, message: str, turn: int | None = None) -> None:
        self.emit(ErrorEvent(turn_id=self.turn_id if turn is None else turn, code=code, message=message))

    def use_knowledge(self, pool: Any) -> None:
        """Retrieval from the knowledge pool on this node: numbered sources in
        each prompt, and the search_knowledge tool."""
        cfg = self.config.knowledge

        async def retrieve(query: str) -> str:
            return format_hits(await pool.search.remote(query, cfg.top_k), max_chars=cfg.context_chars)

        async def search(query: str, n: int) -> list[dict[str, Any]]:
            return [h.to_dict() for h in await pool.search.remote(query, n)]

        self.dialogue.retrieve_knowledge = retrieve
        self.tool_context.knowledge_search = search

    def use_memory(self, store: MemoryStore, owner: str) -> None:
        """Long-term memory of `owner` (a user or a device, never a session):
        recalled into each prompt, written by policy and by the memory tools."""
        self.owner = owner
        k = self.config.memory.recall_k

        async def recall(query: str, n: int = k) -> list[str]:
            return [m.text for m in await store.recall(owner, query, n)]

        async def save(text: str) -> None:
            await store.remember(owner, text, "user")

        async def remember_from(text: str, policy: str) -> None:
            await store.remember_from(owner, text, policy)  # type: ignore[arg-type]

        self.dialogue.recall_memories = recall
        self.dialogue.remember_from = remember_from
        self.tool_context.memory_save = save
        self.tool_context.memory_recall = recall

    def set_persona(self, persona: Persona, llm: LLM, tts: TTS) -> None:
        """Become another persona: its prompt, tools and memory policy, and the
        LLM and TTS built for it (voice, temperature). History stays."""
        self.dialogue.cancel_speculation()
        self.dialogue.persona = persona
        self.dialogue.set_llm(llm)
        self.tts.set_provider(tts)
        self._providers.update(llm=llm, tts=tts)
        self.config = self.config.model_copy(update={"default_persona": persona.id})
        self.tts.set_replies(build_quick_replies(self.config, persona), safe_reply_for(persona, self.moderator))

    def provider_failover(self, message: str) -> None:
        """A provider failed and its chain moved on: the client is told and the
        reply goes on; the operator finds the cause in the log."""
        self.emit_error(ErrorCode.PROVIDER_FAILOVER, message, self.reply_turn)

    def served_by(self) -> dict[str, str]:
        """Which provider of each failover chain answered last."""
        served = {}
        for stage, provider in self._providers.items():
            name = getattr(getattr(provider, "chain", None), "served_by", None)
            if name:
                served[stage] = name
        return served

    def child_crashed(self, child: str, error: BaseException) -> None:
        """A child's bug: logged with its traceback and this session's id for
        the operator; the client gets the stable `internal` code, no details."""
        log.error("session %s: %s failed", self.session_id, child, exc_info=(type(error), error, error.__traceback__))
        self.emit_error(ErrorCode.INTERNAL, f"{child} failed: {type(error).__name__}")

    def timer(self, turn: int) -> TurnTimer:
        return self._timers.setdefault(turn, TurnTimer())

    # ------------------------------------------------------------ input
    def send_audio(self, frames: list[tuple[int | None, bytes]], sample_rate: int = SAMPLE_RATE,
                   stream: str = "") -> int:
        """Validate a batch of frames and queue the good ones; returns how many were accepted."""
        self.last_activity = time.monotonic()
        cfg = self.config.session
        if sample_rate != SAMPLE_RATE:
            self.emit_error(ErrorCode.AUDIO_UNSUPPORTED_FORMAT,
                            f"audio must be PCM16 mono at {SAMPLE_RATE} Hz, got {sample_rate} Hz")
            return 0
        if len(frames) > cfg.max_batch_frames:
            self.emit_error(ErrorCode.AUDIO_BATCH_TOO_LARGE,
                            f"at most {cfg.max_batch_frames} frames per batch, got {len(frames)}")
            return 0
        good: list[tuple[int | None, bytes]] = []
        for seq, pcm in frames:
            if not pcm:
                self.emit_error(ErrorCode.AUDIO_EMPTY, f"frame {seq} is empty")
            elif len(pcm) > cfg.max_frame_bytes:
                self.emit_error(ErrorCode.AUDIO_FRAME_TOO_LARGE,
                                f"frame {seq} has {len(pcm)} bytes; the limit is {cfg.max_frame_bytes}")
            elif len(pcm) % 2:
                self.emit_error(ErrorCode.AUDIO_ODD_LENGTH,
                                f"frame {seq} has {len(pcm)} bytes; PCM16 needs an even count")
            elif seq is not None and (not isinstance(seq, int) or seq < 0):
                self.emit_error(ErrorCode.AUDIO_BAD_SEQUENCE, f"sequence number {seq!r} is not a non-negative int")
            else:
                good.append((seq, bytes(pcm)))
        if good:
            self.audio.post(AudioBatch(None, good, stream))
        return len(good)

    def send_text(self, text: str) -> int | None:
        """A typed message: interrupts any reply and starts a new turn."""
        self.last_activity = time.monotonic()
        text = (text or "").strip()
        if not text:
            self.emit_error(ErrorCode.TEXT_EMPTY, "text message is empty")
            return None
        if len(text) > MAX_TEXT_CHARS:
            self.emit_error(ErrorCode.TEXT_TOO_LONG, f"text is {len(text)} characters; the limit is {MAX_TEXT_CHARS}")
            return None
        return self._start_reply(lambda turn: UserTurn(turn, text))

    def listen(self, state: str, mode: str = "auto") -> None:
        """Client listening state (xiaozhi `listen`, native `listen`); applied
        in order with the audio sent before it."""
        self.last_activity = time.monotonic()
        if state == "start" and mode == "manual":
            self.interrupt()  # push-to-talk cuts the reply short at once
        self.audio.post(ListenControl(None, state, mode))

    def device_message(self, kind: str, payload: Any) -> None:
        """MCP / IoT messages from a device, kept for inspection; MCP replies
        also feed the device's tools (listing, answers to calls)."""
        self.device_state[kind] = payload
        if kind == "mcp":
            self.device_tools.on_message(payload)

    def _device_request(self, payload: dict[str, Any]) -> None:
        """A JSON-RPC message down the device's socket (its adapter encodes it)."""
        self.emit(DeviceRequest(turn_id=self.turn_id, payload=payload))

    def _say_if_open(self, text: str) -> None:
        """A timer or reminder firing: spoken unless the session has ended."""
        if not self.closed:
            self.say(text)

    def _end_after_reply(self) -> None:
        """`end_conversation`: the session ends once the reply in progress
        (the goodbye the model says after the tool) has been spoken."""
        if self._ending is None and not self.closed:
            self._ending = asyncio.get_running_loop().create_task(self._end_when_spoken(self.reply_turn))

    async def _end_when_spoken(self, turn: int | None, limit_s: float = 120.0) -> None:
        """Waits for the turn's reply to finish playing (or be cut short),
        then tells every listener `session.closed` (the ingress closes the
        device's socket normally on it) and closes the session."""
        deadline = time.monotonic() + limit_s
        while turn is not None and self.reply_turn == turn and time.monotonic() < deadline and not self.closed:
            await asyncio.sleep(0.05)
        if self.closed:
            return
        self.tool_context.reminders.cancel_all()
        self.device_tools.cancel_all()
        self.emit_error(ErrorCode.SESSION_CLOSED, "the conversation has ended")
        await self.close()

    def say(self, text: str) -> int:
        """Speak without being asked (timers); interrupts like any new turn."""
        return self._start_reply(lambda turn: AssistantSays(turn, text))

    def interrupt(self, stream_ms: int | None = None) -> bool:
        """The one interruption primitive: barge-in, client abort, new text."""
        turn = self.reply_turn
        if turn is None:
            return False
        self.reply_turn = None
        self.interrupt_stream_ms = stream_ms
        heard = self.tts.heard_text(turn)
        for child in (self.dialogue, self.tts):
            child.interrupt(turn)
        self.dialogue.record_interrupted(turn, heard)
        self._finish_turn(turn, interrupted=True)
        return True

    # ------------------------------------------------------------ from children
    def on_speech_start(self, stream_ms: int) -> int:
        self.last_activity = time.monotonic()
        turn = self._new_turn()
        self.emit(SpeechStart(turn_id=turn, stream_ms=stream_ms))
        self.interrupt(stream_ms)
        self.dialogue.cancel_speculation()
        return turn

    def on_pause(self, turn: int, text: str, pause: int = 0) -> None:
        """A pause in the user's speech, with the words so far (a live
        recogniser's latest, or Whisper's decode of the pause): the reply may
        start now (session.preemptive_generation), and if they end a sentence
        the utterance ends sooner (vad.sentence_end_ms)."""
        if self.config.session.preemptive_generation and turn == self.turn_id and self.reply_turn is None:
            self.dialogue.speculate(turn, text)
        if ends_a_sentence(text):
            self.audio.post(WordsEndASentence(turn, pause))

    def on_resume(self, turn: int) -> None:
        self.dialogue.cancel_speculation(turn)

    def on_speech_end(self, turn: int, stream_ms: int) -> None:
        self.timer(turn).speech_end = time.time()
        self.emit(SpeechEnd(turn_id=turn, stream_ms=stream_ms))

    def on_transcript(self, turn: int, text: str) -> None:
        self.timer(turn).stt_final = time.time()
        self.emit(STTFinal(turn_id=turn, text=text))
        if not text.strip():
            self._finish_turn(turn, interrupted=False)
            return
        if self.reply_turn is not None and self.reply_turn < turn:
            self.interrupt()
        self.reply_turn = turn
        self.dialogue.post(UserTurn(turn, text))

    def on_reply_done(self, turn: int) -> None:
        if self.reply_turn == turn:
            self.reply_turn = None
        self._finish_turn(turn, interrupted=False)

    # ------------------------------------------------------------ internals
    def _start_reply(self, message: Callable[[int], Message]) -> int:
        """A turn that starts from text, not speech: cut any reply, then answer."""
        self.interrupt()
        turn = self._new_turn()
        self.timer(turn).text_in = time.time()
        self.reply_turn = turn
        self.dialogue.post(message(turn))
        return turn

    def _new_turn(self) -> int:
        self.turn_id += 1
        return self.turn_id

    def _finish_turn(self, turn: int, interrupted: bool) -> None:
        timer = self._timers.pop(turn, None)
        if timer is not None:
            self.emit(timer.to_event(turn, interrupted).model_copy(update={"served_by": self.served_by() or None}))

    def history_changed(self) -> None:
        """Persist the history soon; writes are serialised and the latest
        snapshot wins, so a burst of changes costs one or two writes."""
        if self._store is None:
            return
        self._history_dirty = True
        if self._saver is None or self._saver.done():
            self._saver = asyncio.get_running_loop().create_task(self._save_history())

    async def _save_history(self) -> None:
        assert self._store is not None
        while self._history_dirty:
            self._history_dirty = False
            try:
                await self._store.save(self.session_id, list(self.dialogue.history), self.tool_context.memory,
                                       self.dialogue.summary)
            except Exception as e:  # a full disk must not end the conversation
                log.error("session %s: could not save history: %s", self.session_id, e)
                self.emit_error(ErrorCode.INTERNAL, "the conversation could not be saved")

    @property
    def store(self) -> HistoryStore | None:
        return self._store

    async def forget_history(self) -> None:
        if self._store is not None:
            await self._store.forget(self.session_id)

    def history(self) -> list[ChatMessage]:
        return list(self.dialogue.history)

    def stats(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id, "turn_id": self.turn_id, "reply_turn": self.reply_turn,
            "subscribers": len(self._subscribers), "dropped_events": self.dropped_events,
            "duplicate_frames": self.audio.duplicates, "lost_frames": self.audio.lost,
            "history_messages": len(self.dialogue.history),
            "sentences_synthesized": self.tts.synthesized, "short_speech_ignored": self.audio.ignored,
            "ended_on_sentence": self.audio.ended_on_sentence,
            "preemptive_replies": dict(self.dialogue.preemptive),
            "stt_decodes": dict(self.stt.decodes),
            "mailbox_backlog": {child.name: child.backlog for child in self._children},
        }

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.interrupt()
        self.dialogue.cancel_speculation()
        self.tool_context.reminders.cancel_all()
        for child in self._children:
            await child.stop()
        if self.moderator is not None:
            await self.moderator.aclose()
        if self._saver is not None:
            await self._saver
