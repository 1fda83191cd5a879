"""A loopback fake of an OpenAI-compatible chat-completions server.

Why a real HTTP server and not a mocked client: the provider under test uses
the official `openai` SDK, and what matters (SSE framing, status codes and
error bodies, first-token latency, a stalled socket, the client hanging up on
barge-in) only shows on a real socket. This fake speaks the wire format the
SDK reads (`/work/shared/provider-wire-facts.md` §4): `POST .../chat/completions`,
`text/event-stream` of `data: {chat.completion.chunk}\\n\\n` ending in
`data: [DONE]\\n\\n`, and OpenAI-style JSON error bodies
`{"error": {"message", "type", "code", "param"}}`.

Each request is answered by a `Script` (queued with `enqueue`, or computed by a
`respond_with` function, else the `default`), and every request is recorded
(`requests`: headers, JSON body, whether the client hung up) so tests can
assert what the client sent and that an interrupted stream really closed its
connection.

Two ways to run it:

    async with FakeOpenAIServer() as fake:   # in the running event loop
        ...
    with FakeOpenAIServer() as fake:         # in its own thread and loop: use this
        ...                                  # when the caller blocks (Ray, sync tests)

Bench mode, a standalone fixed-latency LLM for `bench/`:

    python -m tests.fakes.openai_server --port 8011 --first-token-ms 300 --token-ms 20

Only 127.0.0.1 is ever bound.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Self

from aiohttp import web

HOST = "127.0.0.1"

# ----------------------------------------------------------------- scripts


@dataclass
class Chunk:
    """One SSE event. `delta`/`finish_reason` make a one-choice
    `chat.completion.chunk`; `usage` makes the final usage chunk (`choices: []`,
    sent only when the request asked for `stream_options.include_usage`, as
    real servers do); `raw` is sent verbatim as the event's data (malformed
    JSON, an in-stream `{"error": ...}`)."""

    delta: dict[str, Any] | None = None
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    raw: str | None = None
    delay_s: float = 0.0
    """Silence before this event: first-token latency, pacing, or a stall."""


@dataclass
class Script:
    """How to answer one request. Build with the class methods below, or by
    hand for odd cases."""

    chunks: list[Chunk] = field(default_factory=list)
    status: int = 200
    error_body: dict[str, Any] | None = None
    """For `status != 200`: the `error` object of the JSON body."""
    headers: dict[str, str] = field(default_factory=dict)
    """Extra response headers, e.g. `{"retry-after-ms": "200"}`."""
    headers_delay_s: float = 0.0
    """Silence before the status line (a server that never answers)."""
    end: Literal["done", "eof", "abort"] = "done"
    """After the chunks: `data: [DONE]` then close; close without [DONE];
    or drop the TCP connection mid-stream."""

    # -- builders ----------------------------------------------------------
    @classmethod
    def text(cls, deltas: str | Sequence[str], *, first_token_s: float = 0.0, between_s: float = 0.0,
             usage: dict[str, int] | None = None, finish_reason: str = "stop") -> Script:
        """A streamed text reply. A plain string is split after each space.
        `first_token_s` delays the first event (fixed time to first token);
        `usage` defaults to 10 prompt tokens plus one token per delta."""
        parts = _split_words(deltas) if isinstance(deltas, str) else list(deltas)
        chunks = [Chunk(delta={"role": "assistant", "content": ""}, delay_s=first_token_s)]
        chunks += [Chunk(delta={"content": p}, delay_s=between_s) for p in parts]
        chunks.append(Chunk(delta={}, finish_reason=finish_reason))
        chunks.append(Chunk(usage=usage or _usage(10, len(parts))))
        return cls(chunks=chunks)

    @classmethod
    def tool_calls(cls, calls: Sequence[FakeToolCall | tuple[str, str, str]], *, fragment: int = 4,
                   interleave: bool = True, text_before: str = "", first_token_s: float = 0.0,
                   usage: dict[str, int] | None = None) -> Script:
        """Tool calls streamed the way the SDK sees them: per call a first
        fragment with `index`, `id`, `type`, `function.name` and empty
        `arguments`, then the arguments in `fragment`-character pieces.
        `interleave` sends the calls' fragments round-robin (parallel calls
        mixed), otherwise one call after the other."""
        specs = [c if isinstance(c, FakeToolCall) else FakeToolCall(*c) for c in calls]
        chunks = [Chunk(delta={"role": "assistant", "content": None}, delay_s=first_token_s)]
        if text_before:
            chunks.append(Chunk(delta={"content": text_before}))
        streams = [list(_call_fragments(i, c, fragment)) for i, c in enumerate(specs)]
        ordered = _round_robin(streams) if interleave else [f for s in streams for f in s]
        chunks += [Chunk(delta={"tool_calls": [f]}) for f in ordered]
        chunks.append(Chunk(delta={}, finish_reason="tool_calls"))
        chunks.append(Chunk(usage=usage or _usage(10, len(ordered))))
        return cls(chunks=chunks)

    @classmethod
    def error(cls, status: int, message: str = "", *, type: str | None = None, code: str | None = None,
              headers: dict[str, str] | None = None) -> Script:
        """An HTTP error with an OpenAI-style body (401, 429, 500, ...)."""
        kind, default_code, default_msg = _ERROR_DEFAULTS.get(status, ("api_error", None, "error"))
        body = {"message": message or default_msg, "type": type or kind, "param": None, "code": code or default_code}
        return cls(status=status, error_body=body, headers=dict(headers or {}))

    @classmethod
    def stall(cls, seconds: float, *, before: Sequence[str] = (), headers_first: bool = True) -> Script:
        """No bytes for `seconds`: after the headers and the text deltas in
        `before` (or, with `headers_first=False`, before even the status
        line); then the reply ends normally if the client is still there."""
        if not headers_first:
            return cls(chunks=cls.text(list(before)).chunks, headers_delay_s=seconds)
        chunks = [Chunk(delta={"role": "assistant", "content": ""})]
        chunks += [Chunk(delta={"content": p}) for p in before]
        chunks.append(Chunk(delta={"content": ""}, delay_s=seconds))
        chunks.append(Chunk(delta={}, finish_reason="stop"))
        return cls(chunks=chunks)

    @classmethod
    def stream_error(cls, message: str = "stream failed", *, before: Sequence[str] = ()) -> Script:
        """Text deltas, then an in-stream `{"error": ...}` event (how some
        vendors report content-inspection or overload mid-stream)."""
        chunks = [Chunk(delta={"content": p}) for p in before]
        chunks.append(Chunk(raw=json.dumps({"error": {"message": message, "type": "server_error", "code": None}})))
        return cls(chunks=chunks, end="eof")


@dataclass
class FakeToolCall:
    id: str
    name: str
    arguments: str
    """The JSON text as the model would stream it (may be deliberately broken)."""


_ERROR_DEFAULTS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Bad request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: ("invalid_request_error", "permission_denied", "Permission denied."),
    404: ("invalid_request_error", "model_not_found", "The model does not exist."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests."),
    500: ("server_error", None, "The server had an error while processing your request."),
    502: ("server_error", None, "Bad gateway."),
    503: ("server_error", None, "The engine is currently overloaded, please try again later."),
}


def _split_words(text: str) -> list[str]:
    words = text.split(" ")
    return [w + " " for w in words[:-1]] + ([words[-1]] if words[-1] else [])


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _call_fragments(index: int, call: FakeToolCall, size: int) -> Iterable[dict[str, Any]]:
    yield {"index": index, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}}
    for start in range(0, len(call.arguments), max(1, size)):
        yield {"index": index, "function": {"arguments": call.arguments[start:start + size]}}


def _round_robin(streams: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for k in range(max((len(s) for s in streams), default=0)):
        out += [s[k] for s in streams if k < len(s)]
    return out


# ---------------------------------------------------------------- records


@dataclass
class RecordedRequest:
    """What one client request looked like and how it ended."""

    path: str
    headers: dict[str, str]
    """Lower-cased names."""
    body: dict[str, Any]
    received_at: float
    """`time.monotonic()` when the body was read."""
    completed: bool = False
    """The whole scripted reply was written."""
    disconnected_at: float | None = None
    """`time.monotonic()` when the client hung up before the reply ended."""
    first_chunk_at: float | None = None
    """`time.monotonic()` when the first SSE event of a streamed reply was written."""

    @property
    def disconnected(self) -> bool:
        return self.disconnected_at is not None

    @property
    def authorization(self) -> str | None:
        return self.headers.get("authorization")

    @property
    def model(self) -> str | None:
        return self.body.get("model")

    @property
    def messages(self) -> list[dict[str, Any]]:
        return self.body.get("messages", [])

    @property
    def tools(self) -> list[dict[str, Any]] | None:
        return self.body.get("tools")


Responder = Callable[[RecordedRequest], Script]


# ----------------------------------------------------------------- server


class FakeOpenAIServer:
    """The fake server. `base_url` (…/v1) is what `AsyncOpenAI(base_url=)` takes.

    `api_key`: when set, requests without `Authorization: Bearer <api_key>`
    get a 401 like the real service. Scripts queued with `enqueue` answer
    requests in order; when the queue is empty `respond_with`'s function (if
    any) is asked, else `default` answers.
    """

    def __init__(self, *, api_key: str | None = None, default: Script | None = None, port: int = 0,
                 max_records: int = 10_000) -> None:
        self.api_key = api_key
        self.default = default or Script.text("Hello from the fake server.")
        self.requests: list[RecordedRequest] = []
        self._queue: collections.deque[Script] = collections.deque()
        self._responder: Responder | None = None
        self._port = port
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._thread_loop: asyncio.AbstractEventLoop | None = None
        self._serial = 0
        self._max_records = max_records
        """Oldest records are dropped past this (a long bench run)."""
        self.embed: Callable[[str, int], list[float]] = hashed_embedding
        """How `/v1/embeddings` turns one input text into a vector of the
        requested `dimensions` (default 256); replace to script it."""

    # -- configuration -----------------------------------------------------
    @property
    def port(self) -> int:
        return self._port

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self._port}/v1"

    def enqueue(self, *scripts: Script) -> None:
        self._queue.extend(scripts)

    def respond_with(self, responder: Responder | None) -> None:
        """Answer from a function of the request (multi-step tool loops)."""
        self._responder = responder

    def reset(self) -> None:
        """Forget queued scripts, the responder and recorded requests."""
        self._queue.clear()
        self._responder = None
        self.requests.clear()

    # -- waiting -----------------------------------------------------------
    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
        """Poll `predicate` (e.g. `lambda: fake.requests[-1].disconnected`)
        without blocking the loop; False on timeout."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    def wait_until_sync(self, predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    # -- lifecycle in the running loop --------------------------------------
    async def start(self) -> Self:
        app = web.Application()
        app.router.add_post("/{prefix:.*}chat/completions", self._chat)
        app.router.add_get("/{prefix:.*}models", self._models)
        app.router.add_post("/{prefix:.*}moderations", self._moderations)
        app.router.add_post("/{prefix:.*}embeddings", self._embeddings)
        # handler_cancellation: a client hanging up cancels the handler at
        # once, even mid-stall, so disconnects are recorded when they happen.
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, HOST, self._port)
        await site.start()
        self._port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- lifecycle in a thread of its own ------------------------------------
    def start_in_thread(self) -> Self:
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        failure: list[Exception] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.start())
            except Exception as e:  # noqa: BLE001 - handed to the starting thread, raised there
                failure.append(e)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self.stop())
            loop.close()

        self._thread_loop = loop
        self._thread = threading.Thread(target=run, name="fake-openai-server", daemon=True)
        self._thread.start()
        ready.wait(10)
        if failure:
            raise failure[0]
        return self

    def stop_thread(self) -> None:
        if self._thread_loop is not None and self._thread is not None:
            self._thread_loop.call_soon_threadsafe(self._thread_loop.stop)
            self._thread.join(10)
            self._thread = self._thread_loop = None

    def __enter__(self) -> Self:
        return self.start_in_thread()

    def __exit__(self, *exc: object) -> None:
        self.stop_thread()

    # -- moderations (POST .../moderations) -----------------------------------
    # Kept apart from the chat scripts above: `moderation_requests` records
    # these, `requests` stays chat-only. A text is flagged when it contains a
    # word of `flag_words` (category `harassment`, or the word's own category
    # from `flag_categories`); `moderation_status` answers every call with
    # that HTTP error instead; `moderation_delay_s` delays the answer.

    def moderation_setup(self, *, flag_words: Sequence[str] = (), flag_categories: dict[str, str] | None = None,
                         status: int = 200, delay_s: float = 0.0) -> None:
        self.flag_words = [w.lower() for w in flag_words]
        self.flag_categories = dict(flag_categories or {})
        self.moderation_status = status
        self.moderation_delay_s = delay_s

    async def _moderations(self, request: web.Request) -> web.Response:
        record = await _record(request)
        if isinstance(record, web.Response):
            return record
        records = self.__dict__.setdefault("moderation_requests", [])
        records.append(record)
        del records[:-self._max_records]
        if self.api_key is not None and record.authorization != f"Bearer {self.api_key}":
            return _error_response(Script.error(401, "Incorrect API key provided."))
        delay = getattr(self, "moderation_delay_s", 0.0)
        if delay:
            await asyncio.sleep(delay)
        status = getattr(self, "moderation_status", 200)
        if status != 200:
            return _error_response(Script.error(status))
        inputs = record.body.get("input")
        texts = inputs if isinstance(inputs, list) else [inputs]
        record.completed = True
        model = record.body.get("model") or "fake-moderation"
        return web.json_response({"id": f"modr-fake{len(records):06d}", "model": model,
                                  "results": [self._moderate(str(t or "")) for t in texts]})

    def _moderate(self, text: str) -> dict[str, Any]:
        lowered = text.lower()
        hits = [w for w in getattr(self, "flag_words", []) if w in lowered]
        categories = {getattr(self, "flag_categories", {}).get(w, "harassment") for w in hits}
        names = {"harassment", "hate", "self-harm", "sexual", "violence", *categories}
        return {"flagged": bool(hits), "categories": {n: n in categories for n in sorted(names)},
                "category_scores": {n: (0.99 if n in categories else 0.01) for n in sorted(names)}}

    # -- handlers --------------------------------------------------------------
    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        record = await _record(request)
        if isinstance(record, web.Response):
            return record
        self.requests.append(record)
        if len(self.requests) > self._max_records:
            del self.requests[0]
        try:
            return await self._answer(request, record)
        except (asyncio.CancelledError, ConnectionResetError):
            record.disconnected_at = time.monotonic()
            raise

    def _next_script(self, record: RecordedRequest) -> Script:
        if self.api_key is not None and record.authorization != f"Bearer {self.api_key}":
            return Script.error(401, "Incorrect API key provided.")
        if self._queue:
            return self._queue.popleft()
        if self._responder is not None:
            return self._responder(record)
        return self.default

    async def _answer(self, request: web.Request, record: RecordedRequest) -> web.StreamResponse:
        script = self._next_script(record)
        if script.headers_delay_s:
            await asyncio.sleep(script.headers_delay_s)
        if script.status != 200:
            record.completed = True
            return _error_response(script)
        if not record.body.get("stream"):
            record.completed = True
            return web.json_response(_completion(script, record.model, self._next_id()), headers=script.headers)
        return await self._stream(request, record, script)

    async def _stream(self, request: web.Request, record: RecordedRequest, script: Script) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               **script.headers})
        await response.prepare(request)
        include_usage = bool((record.body.get("stream_options") or {}).get("include_usage"))
        chunk_id, created = self._next_id(), int(time.time())
        for chunk in script.chunks:
            if chunk.delay_s:
                await asyncio.sleep(chunk.delay_s)
            if chunk.usage is not None and not include_usage:
                continue
            data = chunk.raw if chunk.raw is not None else json.dumps(
                _chunk_json(chunk, chunk_id, created, record.model), ensure_ascii=False, separators=(",", ":"))
            await response.write(f"data: {data}\n\n".encode())
            if record.first_chunk_at is None:
                record.first_chunk_at = time.monotonic()
        if script.end == "abort":
            assert request.transport is not None
            request.transport.abort()
            record.completed = True
            return response
        if script.end == "done":
            await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        record.completed = True
        return response

    async def _embeddings(self, request: web.Request) -> web.Response:
        """`POST .../embeddings`: one vector per input from `self.embed`, in
        the `encoding_format: float` shape. A queued error script (status !=
        200) answers instead, so tests can inject 401/429/500 here too."""
        record = await _record(request)
        if isinstance(record, web.Response):
            return record
        record.completed = True
        self.requests.append(record)
        if len(self.requests) > self._max_records:
            del self.requests[0]
        if self.api_key is not None and record.authorization != f"Bearer {self.api_key}":
            return _error_response(Script.error(401, "Incorrect API key provided."))
        if self._queue and self._queue[0].status != 200:
            return _error_response(self._queue.popleft())
        inputs = record.body.get("input")
        inputs = [inputs] if isinstance(inputs, str) else inputs
        if not isinstance(inputs, list) or not inputs or not all(isinstance(t, str) for t in inputs):
            return _error_response(Script.error(400, "'input' must be a string or a list of strings."))
        dims = record.body.get("dimensions") or 256
        if not isinstance(dims, int) or not 1 <= dims <= 8192:
            return _error_response(Script.error(400, "'dimensions' must be an integer from 1 to 8192."))
        data = [{"object": "embedding", "index": i, "embedding": self.embed(t, dims)} for i, t in enumerate(inputs)]
        tokens = sum(len(t.split()) for t in inputs)
        return web.json_response({"object": "list", "data": data, "model": record.body.get("model") or "fake-embedding",
                                  "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    def _next_id(self) -> str:
        self._serial += 1
        return f"chatcmpl-fake{self._serial:06d}"


def _chunk_json(chunk: Chunk, chunk_id: str, created: int, model: str | None) -> dict[str, Any]:
    base: dict[str, Any] = {"id": chunk_id, "object": "chat.completion.chunk", "created": created,
                            "model": model or "fake-model", "system_fingerprint": None}
    if chunk.usage is not None:
        return {**base, "choices": [], "usage": chunk.usage}
    choice = {"index": 0, "delta": chunk.delta or {}, "logprobs": None, "finish_reason": chunk.finish_reason}
    return {**base, "choices": [choice]}


def _error_response(script: Script) -> web.Response:
    return web.json_response({"error": script.error_body or {}}, status=script.status, headers=script.headers)


async def _record(request: web.Request) -> RecordedRequest | web.Response:
    """The request as the tests see it, or the 400 the real API gives a body that is not JSON."""
    try:
        body = await request.json()
    except ValueError:
        return _error_response(Script.error(400, "We could not parse the JSON body of your request."))
    return RecordedRequest(path=request.path, headers={k.lower(): v for k, v in request.headers.items()},
                           body=body, received_at=time.monotonic())


def _completion(script: Script, model: str | None, completion_id: str) -> dict[str, Any]:
    """The non-streaming answer: the script's deltas assembled."""
    text, calls, finish, usage = "", {}, "stop", None
    for chunk in script.chunks:
        delta = chunk.delta or {}
        text += delta.get("content") or ""
        for frag in delta.get("tool_calls") or []:
            call = calls.setdefault(frag["index"], {"id": "", "type": "function",
                                                    "function": {"name": "", "arguments": ""}})
            call["id"] = frag.get("id") or call["id"]
            fn = frag.get("function") or {}
            call["function"]["name"] = fn.get("name") or call["function"]["name"]
            call["function"]["arguments"] += fn.get("arguments") or ""
        finish = chunk.finish_reason or finish
        usage = chunk.usage or usage
    message: dict[str, Any] = {"role": "assistant", "content": text or None}
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    return {"id": completion_id, "object": "chat.completion", "created": int(time.time()),
            "model": model or "fake-model",
            "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
            "usage": usage}


def hashed_embedding(text: str, dims: int = 256) -> list[float]:
    """A deterministic bag-of-words vector (words and CJK characters hashed
    into `dims` buckets): texts sharing words get a high cosine, unrelated
    ones a low one, which is all a retrieval test needs from a model."""
    import re
    import zlib

    vec = [0.0] * dims
    for token in re.findall(r"[a-z0-9]{3,}|[\u3400-\u9fff]", text.lower()):
        vec[zlib.crc32(token.encode()) % dims] += 1.0
    return vec


# -------------------------------------------------------------- bench mode


def main(argv: Sequence[str] | None = None) -> None:
    """Serve a fixed-latency text reply until interrupted (for bench/)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--first-token-ms", type=float, default=300.0)
    p.add_argument("--token-ms", type=float, default=20.0)
    p.add_argument("--reply", default="Sure. This is a fixed reply from the fake language model.")
    p.add_argument("--api-key", default=None)
    args = p.parse_args(argv)
    default = Script.text(args.reply, first_token_s=args.first_token_ms / 1000, between_s=args.token_ms / 1000)

    async def serve() -> None:
        async with FakeOpenAIServer(api_key=args.api_key, default=default, port=args.port) as fake:
            print(f"fake OpenAI-compatible server at {fake.base_url}", flush=True)
            await asyncio.Event().wait()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
