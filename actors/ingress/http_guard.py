"""What every HTTP request passes before a route sees it: a size limit
enforced from the declared length (and while reading, for chunked bodies), a
JSON body parsed with depth, number and string limits, and one error
envelope (`{"error": {"code", "message"}}`) for everything the framework
itself would have answered in its own shape.

Plain ASGI, so it also guards the bodies FastAPI parses before a route runs
(a 40 MB login body used to be read and parsed in full).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from actors import safe_json

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def error_body(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}).encode()


async def send_error(send: Send, status: int, code: str, message: str,
                     headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = error_body(code, message)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class BodyLimits:
    """The replica's body limits. The middleware is attached to the module's
    FastAPI app before any configuration exists, and Serve rebuilds the
    ingress class in the replica from a pickle (a module global set in its
    `__init__` lands in a copy), so the replica sets them here, on a real
    module, when it starts."""

    def __init__(self) -> None:
        self.json_bytes = 64 * 1024
        self.upload_bytes = 10 * 1024 * 1024
        self.upload_paths: frozenset[str] = frozenset()

    def set(self, json_bytes: int, upload_bytes: int, upload_paths: tuple[str, ...]) -> None:
        self.json_bytes, self.upload_bytes, self.upload_paths = json_bytes, upload_bytes, frozenset(upload_paths)

    def limit_for(self, path: str) -> int:
        """Audio uploads may be large; every other body is small JSON."""
        return self.upload_bytes if path in self.upload_paths else self.json_bytes


body_limits = BodyLimits()


class Cors:
    """CORS for browser pages (the xiaozhi test page calls OTA from another
    origin; without an answer to its preflight `OPTIONS` it cannot start).
    Starlette's middleware, built on the first request from the origins the
    replica set (same reason as BodyLimits: no config exists at import)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._cors: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._cors is None:
            from starlette.middleware.cors import CORSMiddleware

            self._cors = CORSMiddleware(self.app, allow_origins=list(cors_origins), allow_methods=["*"],
                                        allow_headers=["*"], allow_credentials=False, max_age=600)
        await self._cors(scope, receive, send)


cors_origins: list[str] = ["*"]
"""Set from `ingress.cors_allowed_origins` (`configure`) before the first request."""


def configure(json_bytes: int, upload_bytes: int, upload_paths: tuple[str, ...], origins: list[str]) -> None:
    """Each process that serves routes sets its limits and origins here when it starts."""
    body_limits.set(json_bytes, upload_bytes, upload_paths)
    cors_origins[:] = origins


async def json_body(request: Any) -> Any:
    """A request's body as JSON, or None: BodyGuard has already refused JSON
    it could not parse safely, so this never sees deep nesting."""
    data = await request.body()
    if not data:
        return None
    try:
        return safe_json.loads(data)
    except safe_json.JSONLimitError:
        return None


class BodyGuard:
    """ASGI middleware: each request's byte limit comes from `body_limits`;
    JSON bodies are checked by `safe_json` before FastAPI's own parser (which
    would raise RecursionError on deep nesting) sees them."""

    def __init__(self, app: ASGIApp, max_json_depth: int = 32) -> None:
        self.app = app
        self._depth = max_json_depth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        content_type = headers.get("content-type", "").split(";")[0].strip().lower()
        limit = body_limits.limit_for(scope.get("path", ""))
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.isascii() or not declared.isdigit() or len(declared) > 18:
                await send_error(send, 400, "request.bad_length", "Content-Length is not a number")
                return
            if int(declared) > limit:
                await send_error(send, 413, "limit.too_large",
                                 f"request body is {int(declared)} bytes; the limit here is {limit}")
                return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body.extend(message.get("body", b""))
            if len(body) > limit:
                await send_error(send, 413, "limit.too_large", f"request body is over the limit of {limit} bytes")
                return
            if not message.get("more_body"):
                break
        if content_type == "application/json" and body:
            try:
                safe_json.loads(bytes(body), max_bytes=limit, max_depth=self._depth)
            except safe_json.JSONLimitError as e:
                await send_error(send, 400, "request.bad_json", f"the JSON body was refused: {e}")
                return
        await self.app(scope, _replay(bytes(body)), send)


def _replay(body: bytes) -> Receive:
    """The body already read, handed to the app as if it came off the wire;
    after it, the app waits for the disconnect like on a live connection."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    return receive
