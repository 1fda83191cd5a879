"""Preemptive generation: a reply started at a pause in the user's speech,
on the words heard so far, before the turn is sure to have ended.

`DialogueState.speculate` starts one; its chunks wait in a `Speculation`,
unseen, until the final transcript confirms it (the same words: the turn
goes on with it) or not (it is dropped and its LLM stream closed). Words
moderation blocks never reach the LLM this way either: the local rules are
checked before it starts, the moderation endpoint before the LLM is asked.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field

from actors.agent.moderation import Moderator
from actors.providers.base import LLM, ChatMessage, LLMChunk, ToolSpec


@dataclass
class Speculation:
    """A reply started at a pause on the words heard so far; its chunks wait
    here, unseen, until the final transcript confirms or discards them."""

    turn: int
    text: str
    history_len: int
    started: float = field(default_factory=time.time)
    chunks: asyncio.Queue[LLMChunk | BaseException | None] = field(default_factory=asyncio.Queue)
    task: asyncio.Task[None] | None = None
    first_text_at: float | None = None
    blocked: bool = False
    """Moderation blocked the words: the LLM was never asked."""


def same_words(a: str, b: str) -> bool:
    """Equal but for case, spaces and punctuation (a final transcript adds
    punctuation its interims lacked)."""
    def squash(s: str) -> str:
        return re.sub(r"[\W_]+", "", s.lower())
    return squash(a) == squash(b)


async def pump(spec: Speculation, llm: LLM, prompt: Callable[[], Awaitable[list[ChatMessage]]],
               tools: list[ToolSpec], moderator: Moderator | None) -> None:
    """The speculative LLM stream into `spec.chunks`; an error is handed to
    the turn, which reports it as a live stream's error."""
    try:
        if moderator is not None and (await moderator.screen_user(spec.text)).blocked:
            spec.blocked = True  # the endpoint's verdict: the turn asks the LLM afresh if it ever goes on
            return
        async with aclosing(llm.stream(await prompt(), tools)) as chunks:
            async for chunk in chunks:
                if chunk.text and spec.first_text_at is None:
                    spec.first_text_at = time.time()
                spec.chunks.put_nowait(chunk)
    except Exception as e:
        spec.chunks.put_nowait(e)
    finally:
        spec.chunks.put_nowait(None)


async def drain(spec: Speculation) -> AsyncIterator[LLMChunk]:
    """The speculative stream's chunks, then the rest as they come; closing
    this closes the LLM stream behind it."""
    try:
        while (item := await spec.chunks.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        if spec.task is not None:
            spec.task.cancel()
