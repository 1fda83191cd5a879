"""`StartingSession` in a registry: another caller of a session whose actor
is still starting waits for every step chained on it (the socket's
subscription last), and a failed step does not fail it. No Ray."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from actors.session_ref import StartingSession


async def test_the_registry_lists_the_last_step_until_it_has_run():
    registry: dict[str, StartingSession] = {}
    up: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    subscribed = asyncio.Event()
    order: list[str] = []

    async def subscribe(ref: Any) -> None:
        await subscribed.wait()
        order.append("subscribed")

    starting = StartingSession("s1", up, registry)
    assert registry["s1"] is starting
    chained = starting.then(subscribe)
    assert registry["s1"] is chained

    async def other_caller() -> None:
        ref = await registry["s1"].settled()
        order.append(f"other got {ref}")

    other = asyncio.create_task(other_caller())
    up.set_result("ref-1")
    await asyncio.sleep(0.01)
    assert order == [] and "s1" in registry  # the actor is up, its socket not yet listening
    subscribed.set()
    assert await chained == "ref-1"
    await other
    assert order == ["subscribed", "other got ref-1"] and registry == {}


async def test_a_failed_step_fails_its_own_caller_only():
    registry: dict[str, StartingSession] = {}

    async def broken(ref: Any) -> None:
        raise ConnectionError("the socket closed")

    up: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    chained = StartingSession("s2", up, registry).then(broken)
    settled = asyncio.create_task(registry["s2"].settled())
    up.set_result("ref-2")
    with pytest.raises(ConnectionError):
        await chained
    assert await settled == "ref-2" and registry == {}


async def test_a_failed_start_fails_everyone():
    registry: dict[str, StartingSession] = {}

    async def failing() -> Any:
        raise RuntimeError("no worker")

    starting = StartingSession("s3", failing(), registry)
    with pytest.raises(RuntimeError):
        await registry["s3"].settled()
    with pytest.raises(RuntimeError):
        await starting
    assert registry == {}
