"""The device gateway's guard on connections that owe a request
(actors/ingress/connection_guard.py), on a real uvicorn server with the
protocol class the gateway uses; the gateway itself is checked in
tests/test_device_gateway.py."""

from __future__ import annotations

import asyncio
import time

import pytest
import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol
from websockets.asyncio.client import connect

from actors.ingress.connection_guard import REFUSED, TIMED_OUT, PendingConnections, guarded_protocol

PORT = 18771
READ_S = 1.5
PER_ADDRESS = 4


async def app(scope, receive, send):
    if scope["type"] == "websocket":
        await receive()  # connect
        await send({"type": "websocket.accept"})
        while (message := await receive())["type"] == "websocket.receive":
            await send({"type": "websocket.send", "text": message.get("text") or ""})
        return
    body = b""
    while True:  # the whole body, as the OTA route reads it
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["path"] == "/slow":  # the server takes its time: not the peer's
        await asyncio.sleep(READ_S * 2.5)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture
async def server():
    codes: list[str] = []
    pending = PendingConnections(PER_ADDRESS, 100)
    protocol = guarded_protocol(AutoHTTPProtocol, pending, READ_S, codes.append)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=PORT, http=protocol, ws="websockets-sansio",
                                        loop="none", lifespan="off", log_level="warning"))
    task = asyncio.create_task(srv.serve())
    while not srv.started:
        await asyncio.sleep(0.02)
    yield codes, pending
    srv.should_exit = True
    await task


async def closed_after(payload: bytes = b"", wait_s: float = 10.0) -> float:
    """Open a raw connection, send `payload`, → seconds until the server closed it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", PORT)
    t0 = time.monotonic()
    if payload:
        writer.write(payload)
        await writer.drain()
    try:
        while await asyncio.wait_for(reader.read(1024), wait_s):
            pass
        return time.monotonic() - t0
    finally:
        writer.close()


async def request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str = "/") -> bytes:
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    return head + await asyncio.wait_for(reader.readexactly(2), 10)


async def test_a_connection_that_never_sends_its_request_is_closed(server):
    codes, pending = server
    silent, half_headers, half_body = await asyncio.gather(
        closed_after(),
        closed_after(b"GET / HTTP/1.1\r\nHost: x\r\n"),
        closed_after(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"a\""))
    for took in (silent, half_headers, half_body):
        assert READ_S * 0.8 < took < READ_S * 5, took
    assert codes.count(TIMED_OUT) == 3 and pending.total == 0


async def test_an_address_holds_a_few_pending_connections_then_is_refused(server):
    codes, pending = server
    held = [await asyncio.open_connection("127.0.0.1", PORT) for _ in range(PER_ADDRESS)]
    await asyncio.sleep(0.1)
    assert pending.total == PER_ADDRESS
    assert await closed_after(wait_s=READ_S / 2) < READ_S / 2  # closed as it opened
    assert codes == [REFUSED]
    for _, writer in held:
        writer.close()
    await asyncio.sleep(0.1)
    assert pending.total == 0
    reader, writer = await asyncio.open_connection("127.0.0.1", PORT)  # room again
    assert (await request(reader, writer)).startswith(b"HTTP/1.1 200")
    writer.close()


async def test_requests_in_time_and_the_servers_own_time_are_not_cut(server):
    codes, pending = server
    reader, writer = await asyncio.open_connection("127.0.0.1", PORT)
    # kept alive: each request is owed from the last response, not from the opening
    for _ in range(3):
        assert (await request(reader, writer)).startswith(b"HTTP/1.1 200")
        await asyncio.sleep(READ_S * 0.6)
    # a response the server takes longer than READ_S to make
    assert (await request(reader, writer, "/slow")).startswith(b"HTTP/1.1 200")
    writer.close()
    assert codes == []


async def test_a_websocket_leaves_the_guard(server):
    codes, pending = server
    sockets = [await connect(f"ws://127.0.0.1:{PORT}/ws", proxy=None) for _ in range(PER_ADDRESS + 1)]
    await asyncio.sleep(READ_S * 2)  # past the request deadline, with more sockets than the cap
    for ws in sockets:
        await ws.send("still here")
        assert await asyncio.wait_for(ws.recv(), 5) == "still here"
        await ws.close()
    assert codes == [] and pending.total == 0
