"""SessionHandle: one session actor, from a notebook, a script or the CLI.

Every call comes in two forms with one naming rule: `aname` is a coroutine to
await (Jupyter, IPython, any asyncio code), `name` blocks until done.

    session = await SessionHandle.aopen(config=config)      session = SessionHandle.open(config=config)
    result = await session.aask_text("What time is it?")    result = session.ask_text("What time is it?")

The blocking form works whether or not an event loop runs in the calling
thread. Jupyter's kernel runs one, and there `asyncio.run` refuses to start;
so the coroutine runs on a private event loop in a worker thread while the
caller's thread waits. Loops are never nested (nest_asyncio re-enters the
kernel's loop in the middle of a step, which libraries do not expect). The
awaitable forms make no blocking call: they await the actor's methods.

A recording may hold several utterances (a person reading a paragraph,
pausing longer than `vad.end_silence_ms` between sentences). The session
answers each utterance as a turn of its own, and each new utterance
interrupts the reply still being spoken (barge-in), exactly as if the person
had talked over it. `ask_audio_turns` / `ask_wav_turns` return every one of
those turns once the last has ended; `ask_audio` / `ask_wav` return the first
(what a one-question recording gives, and what they always returned).
"""

from __future__ import annotations

import asyncio
import threading
import warnings
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import ray

from actors.audio import read_wav, silence, split_frames
from actors.config import AppConfig, load_config
from actors.session_ref import SessionRef
from actors.sessions import (
    TurnResult,
    TurnResults,
    collect_turn,
    collect_turns,
    new_session_id,
    open_session,
    send_recording,
)

T = TypeVar("T")

FRAME_MS = 60
"""Frames as a xiaozhi device sends them; batched `batch_ms` per actor call."""
END_PADDING_MS = 1500
"""Silence added after a recording so the VAD (end_silence_ms 600 by
default) sees its last utterance end even when the file stops mid-breath."""


class SessionHandle:
    """One session (in the config's namespace), on the actor hosting it: the
    same session a device or the ingress may be talking to, with its history.
    `actor` works like a Ray actor handle (`session.actor.history.remote()`)."""

    def __init__(self, session_id: str, actor: SessionRef) -> None:
        self.session_id = session_id
        self.actor = actor

    def __repr__(self) -> str:
        return f"SessionHandle(session_id={self.session_id!r})"

    # ------------------------------------------------------------ open
    @classmethod
    async def aopen(cls, session_id: str | None = None, config: AppConfig | None = None) -> SessionHandle:
        """Resume the live session `session_id` (or bring it back with its stored
        conversation), else start a new one; → once the actor is ready."""
        config = config or await asyncio.to_thread(load_config)
        sid = session_id or new_session_id()
        return cls(sid, await open_session(config, sid))

    @classmethod
    def open(cls, session_id: str | None = None, config: AppConfig | None = None) -> SessionHandle:
        """Blocking `aopen`."""
        return run_blocking(cls.aopen(session_id, config))

    # ------------------------------------------------------------ text
    async def aask_text(self, text: str, timeout_s: float = 60.0) -> TurnResult:
        """A typed message → its turn, once the reply has been spoken. Like any
        new input it cuts short a reply still in progress."""

        async def send() -> bool:
            return await self.actor.send_text.remote(text) is not None

        return await collect_turn(self.actor, send, timeout_s)

    def ask_text(self, text: str, timeout_s: float = 60.0) -> TurnResult:
        """Blocking `aask_text`."""
        return run_blocking(self.aask_text(text, timeout_s))

    # ------------------------------------------------------------ audio: every turn
    async def aask_audio_turns(self, pcm16: bytes, timeout_s: float = 60.0, batch_ms: int = 600) -> TurnResults:
        """PCM16 mono 16 kHz → every turn it started, in order, once the last
        has ended (`timeout_s` is for all of them). Earlier turns usually
        come back `interrupted`, cut short by the next utterance. Empty when
        the recording held no speech (`.errors` then says if it was refused)."""
        frames = split_frames(pcm16 + silence(END_PADDING_MS), FRAME_MS)
        per_batch = max(1, batch_ms // FRAME_MS)
        return await collect_turns(self.actor, lambda: send_recording(self.actor, frames, per_batch), timeout_s)

    def ask_audio_turns(self, pcm16: bytes, timeout_s: float = 60.0, batch_ms: int = 600) -> TurnResults:
        """Blocking `aask_audio_turns`."""
        return run_blocking(self.aask_audio_turns(pcm16, timeout_s, batch_ms))

    async def aask_wav_turns(self, path: str | Path, timeout_s: float = 60.0) -> TurnResults:
        """`aask_audio_turns` for any 16-bit WAV file (downmixed, resampled)."""
        return await self.aask_audio_turns(await asyncio.to_thread(read_wav, path), timeout_s)

    def ask_wav_turns(self, path: str | Path, timeout_s: float = 60.0) -> TurnResults:
        """Blocking `aask_wav_turns`."""
        return run_blocking(self.aask_wav_turns(path, timeout_s))

    # ------------------------------------------------------------ audio: the first turn
    async def aask_audio(self, pcm16: bytes, timeout_s: float = 60.0, batch_ms: int = 600) -> TurnResult:
        """PCM16 mono 16 kHz → the FIRST turn it started, returned once all of
        its turns have ended. Warns when there were more: `aask_audio_turns`
        returns them all. With no speech: a result with no transcript."""
        return first_turn(await self.aask_audio_turns(pcm16, timeout_s, batch_ms), "ask_audio")

    def ask_audio(self, pcm16: bytes, timeout_s: float = 60.0, batch_ms: int = 600) -> TurnResult:
        """Blocking `aask_audio`."""
        return run_blocking(self.aask_audio(pcm16, timeout_s, batch_ms))

    async def aask_wav(self, path: str | Path, timeout_s: float = 60.0) -> TurnResult:
        """`aask_audio` for any 16-bit WAV file: its FIRST turn."""
        return first_turn(await self.aask_wav_turns(path, timeout_s), "ask_wav")

    def ask_wav(self, path: str | Path, timeout_s: float = 60.0) -> TurnResult:
        """Blocking `aask_wav`."""
        return run_blocking(self.aask_wav(path, timeout_s))

    # ------------------------------------------------------------ the rest
    async def ahistory(self) -> list[dict[str, Any]]:
        """The conversation as the session keeps it (interrupted replies hold
        only what was heard)."""
        return await self.actor.history.remote()

    def history(self) -> list[dict[str, Any]]:
        """Blocking `ahistory`."""
        return run_blocking(self.ahistory())

    async def ainterrupt(self) -> bool:
        """Cut the reply in progress short; False if none was."""
        return await self.actor.interrupt.remote()

    def interrupt(self) -> bool:
        """Blocking `ainterrupt`."""
        return run_blocking(self.ainterrupt())

    async def aclose(self) -> None:
        """End the session actor (its conversation stays in the store)."""
        try:
            await self.actor.close.remote()
        except ray.exceptions.RayActorError:
            pass  # it exits while answering: that is the point

    def close(self) -> None:
        """Blocking `aclose`."""
        run_blocking(self.aclose())


def first_turn(turns: TurnResults, method: str) -> TurnResult:
    """The single-turn answer to a recording: its first turn, or a result with
    no transcript (and the refusal's errors) when it held no speech."""
    if not turns:
        return TurnResult(turn_id=turns.since_turn, errors=turns.errors, events=list(turns.errors))
    if len(turns) > 1:
        warnings.warn(f"the recording held {len(turns)} utterances, each answered as a turn; {method} returns "
                      f"the first, {method}_turns returns them all", stacklevel=2)
    return turns[0]


# ---------------------------------------------------------------- sync over async
_private: tuple[asyncio.AbstractEventLoop, threading.Thread] | None = None
_private_lock = threading.Lock()


def _private_loop() -> asyncio.AbstractEventLoop:
    """One event loop in a daemon thread, started on first need and shared by
    every handle: it outlives each call, so a cancelled call can still clean
    up (unsubscribe from the session) after the caller has moved on."""
    global _private
    with _private_lock:
        if _private is None or not _private[1].is_alive():
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="voice-actors-sync", daemon=True)
            thread.start()
            _private = (loop, thread)
        return _private[0]


def run_blocking(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` to completion and return its result, from synchronous code.

    No loop running in this thread (a script): `asyncio.run`. A loop running
    (Jupyter, IPython, an async test): the private loop in its own thread,
    while this thread waits; this blocks the caller's loop for the call, which
    is what a blocking call means. Interrupting the wait (the kernel's stop
    button) cancels the call."""
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    loop = _private_loop()
    if running is loop:
        coro.close()
        raise RuntimeError("a blocking SessionHandle call from the handle's own loop would wait forever; "
                           "await the `a...` form instead")
    future = asyncio.run_coroutine_threadsafe(coro, loop)
    try:
        return future.result()
    except BaseException:
        future.cancel()
        raise
