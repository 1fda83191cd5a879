"""Malformed input over REAL sockets, through the Ray Serve proxy (issue 12, item 7).

For each protocol (native `/ws/voice`, xiaozhi `/xiaozhi/v1/`, text stream
`/ws/text/stream`) a seeded corpus of at least 10,000 malformed messages is
sent to a Serve app started with `run_ingress`: random bytes, truncated and
deeply nested JSON, wrong types, unknown types, binary before hello, odd-length
PCM, oversized frames, invalid Opus, bad xiaozhi protocol-2/3 headers.

Most of it goes after a hello, many messages per socket, in batches closed by
a marker message whose error reply says the batch was read; the server must
answer every message the local copy of its adapter refuses with exactly that
error code (the adapter is the oracle). Messages that end a socket (anything
wrong before or in the hello) are sent one per fresh socket, and every close
is counted by code. Afterwards: no Serve replica, pool or session actor died
or restarted (same PIDs), every fuzzed session still answers, and a normal
turn works on a fresh socket.

VA_FUZZ_MESSAGES (default 10000) sets the corpus size per protocol."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import random
import struct
import time
from collections.abc import Callable
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from actors.client import NativeClient
from actors.ingress.limits import LimitError, check_size
from actors.protocols.base import Greet, Hello, ProtocolError, Text
from actors.protocols.native import NativeProtocol
from actors.protocols.opus import OpusEncoder
from actors.protocols.text_stream import TextStreamProtocol
from actors.protocols.xiaozhi import V2_HEADER, V3_HEADER, XiaozhiProtocol, pack_frame
from tests.conftest import INGRESS_PORT, run_ingress

WS = f"ws://127.0.0.1:{INGRESS_PORT}"
SEED = 20261212
N_MESSAGES = int(os.environ.get("VA_FUZZ_MESSAGES", "10000"))
PRE_HELLO_SHARE = 0.04
"""Share of each corpus sent before (or as) the hello: each one costs a socket."""
BATCH = 250
SOCKETS_PER_PROTOCOL = 2
PARALLEL_OPENS = 8
ROUTES = {"native": "/ws/voice", "xiaozhi": "/xiaozhi/v1/", "text": "/ws/text/stream"}
ERROR_PREFIXES = ("protocol.", "audio.", "xiaozhi.", "limit.")
"""Error codes that come from parsing a client message (session errors are others)."""


# ------------------------------------------------------------------ server
@pytest.fixture(scope="module")
def fuzz_config(config):
    """Auth off (anonymous callers; xiaozhi devices by Device-Id) and the
    per-socket message rate lifted, so every fuzz message reaches the parser
    instead of the rate limiter."""
    auth = config.auth.model_copy(update={"enabled": False})
    limits = config.limits.model_copy(update={
        "requests_per_minute": 10 ** 6, "burst": 100_000, "ws_messages_per_second": 10 ** 6,
        "max_sessions_per_client": 64, "max_live_sessions_per_principal": 64})
    return config.model_copy(update={"auth": auth, "limits": limits})


@pytest.fixture(scope="module")
def server(ray_cluster, fuzz_config):
    yield from run_ingress(fuzz_config, "voice-actors-fuzz")


def actor_pids() -> dict[str, tuple[str, int, int]]:
    """Every live actor of this Ray instance: id → (class, PID, restarts)."""
    import ray

    out = {}
    for actor_id, info in ray._private.state.actors().items():
        if info.get("State") in ("ALIVE", 2):
            cls = info.get("ActorClassName") or info.get("Name") or "?"
            out[actor_id] = (cls, int(info.get("Pid") or 0), int(info.get("NumRestarts") or 0))
    return out


def exited_on_purpose() -> set[str]:
    """Actors that ended themselves (`exit_actor`): a spare session actor of an
    earlier test module's server retiring during the fuzz is not a crash."""
    import ray

    return {actor_id for actor_id, info in ray._private.state.actors().items()
            if info.get("State") in ("DEAD", 4) and "INTENDED_USER_EXIT" in str(info.get("DeathCause") or "")}


# ------------------------------------------------------------------ corpus
WORDS = ["hello", "text", "interrupt", "listen", "ping", "history", "abort", "mcp", "iot", "goodbye", "", "HELLO",
         "text ", "tts", "stt", "audio", "__proto__", "constructor", "null"]
FIELDS = ["type", "id", "text", "state", "mode", "reason", "payload", "session_id", "version", "audio", "output",
          "audio_params", "transport", "features", "descriptors", "states", "update", "persona"]


def rand_scalar(rng: random.Random) -> Any:
    return rng.choice([
        lambda: None, lambda: rng.random() < 0.5, lambda: rng.randint(-2 ** 63, 2 ** 63),
        lambda: rng.randint(-5, 70000), lambda: rng.uniform(-1e6, 1e6), lambda: "x" * rng.randint(0, 80),
        lambda: rng.choice(WORDS), lambda: "".join(chr(rng.randint(0x20, 0x2FFF)) for _ in range(rng.randint(0, 12))),
        lambda: 10 ** rng.randint(20, 99), lambda: "start", lambda: "detect", lambda: "manual",
    ])()


def rand_value(rng: random.Random, depth: int = 0) -> Any:
    r = rng.random()
    if depth > 3 or r < 0.6:
        return rand_scalar(rng)
    if r < 0.8:
        return [rand_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {rng.choice(FIELDS + WORDS): rand_value(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def nested_json(rng: random.Random) -> str:
    depth = rng.choice([rng.randint(20, 40), rng.randint(30, 1200), rng.randint(900, 12_000)])
    opener, closer = rng.choice([("[", "]"), ('{"a":', "}"), ('[{"k":', "}]")])
    inner = rng.choice(["1", "null", '"x"', "[]", "{}"])
    body = opener * depth + inner + (closer * depth if rng.random() < 0.7 else "")
    if rng.random() < 0.5:
        return '{"type": "%s", "id": %s}' % (rng.choice(["ping", "text", "hello", "listen"]), body)
    return body


def bad_json(rng: random.Random) -> str:
    return rng.choice([
        "NaN", "[Infinity]", '{"type": "ping", "id": NaN}', '{"type": "ping", "id": -Infinity}', "1e999",
        '{"type": "ping", "id": 1e999}', '{"type": "text", "text": "\\ud800"}', '{"\\udc00": 1, "type": "ping"}',
        '{"type": "ping", "id": ' + "9" * rng.randint(101, 6000) + "}", "", " ", "{", "}", "[", "null", "true",
        "0", '"text"', "[1, 2, 3]", "{}", '{"type": null}', '{"type": 5}', '{"type": ["ping"]}', "\ufeff{}",
        '{"type": "ping",}', "{'type': 'ping'}", '{"type": "ping"} trailing', '{"type":"ping","type":"text"}',
    ])


def random_text(rng: random.Random) -> str:
    n = rng.randint(0, 300)
    return rng.choice([
        lambda: "".join(chr(rng.randint(0, 0x7F)) for _ in range(n)),
        lambda: bytes(rng.getrandbits(8) for _ in range(n)).decode("latin-1"),
        lambda: "".join(chr(rng.randint(0x80, 0xD7FF)) for _ in range(n)),
    ])()


def truncate(text: str, rng: random.Random) -> str:
    return text[:rng.randint(0, max(0, len(text) - 1))]


def structured(rng: random.Random, protocol: str) -> dict[str, Any]:
    """A message of a known or unknown type whose fields hold the wrong types."""
    kind = rng.choice(WORDS + [rand_scalar(rng)]) if rng.random() < 0.85 else rand_value(rng)
    msg: dict[str, Any] = {"type": kind}
    for name in rng.sample(FIELDS[1:], rng.randint(0, 5)):
        msg[name] = rand_value(rng)
    if protocol == "xiaozhi" and kind == "listen" and rng.random() < 0.5:
        msg.update(state=rng.choice(["start", "stop", "detect", "STOP", 1, None]),
                   mode=rng.choice(["auto", "manual", "realtime", "push", 0, []]))
    if rng.random() < 0.05:
        msg["text"] = "a" * rng.randint(4001, 9000)
    return msg


def text_frame(rng: random.Random, protocol: str) -> str:
    r = rng.random()
    if r < 0.12:
        return random_text(rng)
    if r < 0.27:
        return truncate(json.dumps(structured(rng, protocol)), rng)
    if r < 0.40:
        return nested_json(rng)
    if r < 0.505:
        return bad_json(rng)
    if r < 0.51:
        return json.dumps({"type": "ping", "pad": "x" * rng.randint(64 * 1024, 100 * 1024)})  # over the socket limit
    return json.dumps(structured(rng, protocol))


_OPUS: list[bytes] = []


def opus_packets() -> list[bytes]:
    """A few real 60 ms Opus packets (noise), to corrupt."""
    if not _OPUS:
        rng = random.Random(SEED)
        pcm = b"".join(struct.pack("<h", rng.randint(-8000, 8000)) for _ in range(16000 * 6 // 10))
        _OPUS.extend(OpusEncoder(16000, frame_ms=60).encode(pcm))
    return _OPUS


def random_bytes(rng: random.Random, n: int) -> bytes:
    return rng.getrandbits(8 * n).to_bytes(n, "little") if n else b""


def opus_payload(rng: random.Random) -> bytes:
    r = rng.random()
    if r < 0.4:
        return random_bytes(rng, rng.randint(1, 400))
    packet = bytearray(rng.choice(opus_packets()))
    if r < 0.8:
        for _ in range(rng.randint(1, 6)):
            packet[rng.randrange(len(packet))] = rng.getrandbits(8)
    else:
        packet = packet[:rng.randint(1, len(packet))]
    return bytes(packet)


def binary_frame(rng: random.Random, protocol: str, version: int) -> bytes:
    r = rng.random()
    if r < 0.006:
        return random_bytes(rng, rng.randint(32_001, 64 * 1024))  # over max_frame_bytes, under the socket limit
    if r < 0.01:
        return random_bytes(rng, rng.randint(64 * 1024 + 1, 160 * 1024))  # over the socket limit
    if r < 0.03:
        return b""
    if protocol == "native":
        if r < 0.55:
            return random_bytes(rng, 2 * rng.randint(0, 200) + 1)  # odd-length PCM
        return random_bytes(rng, rng.randint(1, 600))
    if protocol == "xiaozhi" and version in (2, 3) and r < 0.75:
        payload = opus_payload(rng)
        header, fields = (V2_HEADER, [rng.choice([2, 0, 3, 65535]), rng.choice([0, 0, 1, 7, 65535]), 0,
                                      rng.getrandbits(32), len(payload)]) if version == 2 else \
            (V3_HEADER, [rng.choice([0, 0, 1, 255]), rng.getrandbits(8), len(payload)])
        fields[-1] = rng.choice([len(payload), len(payload), len(payload) + 1, max(0, len(payload) - 1),
                                 rng.getrandbits(16)])
        frame = header.pack(*fields) + payload
        return frame[:rng.randint(0, len(frame))] if rng.random() < 0.2 else frame
    if protocol == "xiaozhi":
        return pack_frame(version, opus_payload(rng))
    return random_bytes(rng, rng.randint(1, 600))


def post_hello_message(rng: random.Random, protocol: str, version: int) -> str | bytes:
    binary_share = 0.15 if protocol == "text" else 0.45
    return binary_frame(rng, protocol, version) if rng.random() < binary_share else text_frame(rng, protocol)


GOOD_HELLO = {
    "native": {"type": "hello", "version": 1, "audio": {"format": "pcm16"}},
    "xiaozhi": {"type": "hello", "version": 1, "transport": "websocket", "features": {"mcp": False},
                "audio_params": {"format": "opus", "sample_rate": 16000, "channels": 1, "frame_duration": 60}},
    "text": {"type": "ping", "id": "open"},
}


def bad_hello(rng: random.Random, protocol: str) -> str | bytes:
    """What ends a socket: anything but a good hello as the first message."""
    r = rng.random()
    if r < 0.25:
        return random_bytes(rng, rng.randint(0, 500)) if rng.random() < 0.8 else opus_payload(rng)  # binary first
    if r < 0.45:
        return text_frame(rng, protocol)
    hello = json.loads(json.dumps(GOOD_HELLO[protocol]))
    if protocol == "text":
        hello = {"type": rng.choice(["text", "ping", "interrupt", "hello", 7]), "text": rand_value(rng)}
    for name in rng.sample(FIELDS, rng.randint(1, 4)):
        hello[name] = rand_value(rng)
    if rng.random() < 0.3:
        hello["session_id"] = rng.choice(["../../etc/passwd", "a" * 65, "a.b", "a\n", "", "é", 42, []])
    if protocol == "xiaozhi" and rng.random() < 0.5:
        hello["audio_params"] = rng.choice([
            {"format": "pcm"}, {"sample_rate": "16000"}, {"sample_rate": 8000}, {"channels": 2}, [], "opus",
            {"sample_rate": 1e308}, {"channels": True}])
    text = json.dumps(hello)
    return truncate(text, rng) if rng.random() < 0.15 else text


class Oracle:
    """The connection's own steps, run locally: size check, then the adapter."""

    def __init__(self, adapter: Any, max_bytes: int) -> None:
        self.adapter = adapter
        self.max_bytes = max_bytes

    def feed(self, frame: str | bytes) -> tuple[str, Any]:
        """→ ("error", code), ("fatal", code) or ("ok", actions)."""
        try:
            check_size(len(frame), self.max_bytes, "message")
            if isinstance(frame, bytes):
                actions = self.adapter.on_binary(frame)
            else:
                actions = self.adapter.on_text(frame)
        except LimitError as e:
            return "error", e.code
        except ProtocolError as e:
            return ("fatal" if e.fatal else "error"), e.code
        return "ok", actions


def make_adapter(protocol: str, version: int, config: Any) -> Any:
    if protocol == "native":
        return NativeProtocol(config.session.max_frame_bytes)
    if protocol == "xiaozhi":
        return XiaozhiProtocol(version, config.ingress.xiaozhi_output_sample_rate, config.session.max_frame_bytes,
                               tuple(config.session.wake_words))
    return TextStreamProtocol()


def build_corpus(protocol: str, config: Any, n: int = N_MESSAGES, seed: int = SEED) -> dict[str, Any]:
    """Seeded: the same n messages every run. → {"pre": [(version, frame)],
    "post": {socket index: (version, [frames], [expected codes or None])}}.
    Post-hello messages the oracle would accept as a turn (typed text, a wake
    word) are drawn again: the corpus is malformed input, not conversation."""
    rng = random.Random(f"{seed}-{protocol}")
    max_bytes = config.limits.max_ws_message_bytes
    versions = [1, 2, 3] if protocol == "xiaozhi" else [1]
    n_pre = int(n * PRE_HELLO_SHARE)
    pre = []
    while len(pre) < n_pre:
        version = rng.choice(versions)
        frame = bad_hello(rng, protocol)
        kind, _ = Oracle(make_adapter(protocol, version, config), max_bytes).feed(frame)
        if kind != "ok":  # a hello that happens to be good would open a session: not this corpus
            pre.append((version, frame))
    n_sockets = max(SOCKETS_PER_PROTOCOL, len(versions))
    post: dict[int, Any] = {}
    per_socket = (n - n_pre + n_sockets - 1) // n_sockets
    for i in range(n_sockets):
        version = versions[i % len(versions)]
        oracle = Oracle(make_adapter(protocol, version, config), max_bytes)
        assert oracle.feed(json.dumps(GOOD_HELLO[protocol]))[0] == "ok"
        frames: list[str | bytes] = []
        expected: list[str | None] = []
        while len(frames) < per_socket:
            frame = post_hello_message(rng, protocol, version)
            kind, result = oracle.feed(frame)
            if kind == "ok" and any(isinstance(a, (Text, Greet, Hello)) for a in result):
                continue
            frames.append(frame)
            expected.append(result if kind != "ok" else None)
            assert kind != "fatal", (protocol, frame[:80], result)  # after the hello nothing is fatal
        post[i] = (version, frames, expected)
    return {"pre": pre, "post": post}


# ------------------------------------------------------------------ sending
def headers_for(protocol: str, version: int | str, device: int) -> dict[str, str]:
    if protocol != "xiaozhi":
        return {}
    return {"Protocol-Version": str(version), "Device-Id": f"02:fz:00:00:{device // 256:02x}:{device % 256:02x}",
            "Client-Id": f"fuzz-client-{device}"}


async def open_ws(protocol: str, version: int | str = 1, device: int = 0) -> Any:
    return await connect(WS + ROUTES[protocol], additional_headers=headers_for(protocol, version, device),
                         proxy=None, max_size=None, open_timeout=30, ping_interval=None)


async def close_code_after(protocol: str, version: int | str, frame: str | bytes | None, device: int) -> int | None:
    """Send one frame on a fresh socket and wait for the server to close it."""
    async with await open_ws(protocol, version, device) as ws:
        if frame is not None:
            await ws.send(frame)
        try:
            while True:
                await asyncio.wait_for(ws.recv(), 20)
        except ConnectionClosed:
            pass
        return ws.close_code


async def send_pre_hello(protocol: str, pre: list[tuple[int, str | bytes]]) -> collections.Counter:
    closes: collections.Counter = collections.Counter()
    queue = list(enumerate(pre))

    async def worker(w: int) -> None:
        while queue:
            i, (version, frame) = queue.pop()
            closes[await close_code_after(protocol, version, frame, 1000 + w)] += 1

    await asyncio.gather(*(worker(w) for w in range(PARALLEL_OPENS)))
    return closes


def marker(protocol: str, n: int) -> tuple[str, Callable[[dict[str, Any]], bool]]:
    """A message whose reply shows that everything sent before it was read."""
    name = f"fuzz-mark-{n}"
    if protocol == "xiaozhi":  # no ping in xiaozhi: an unknown type, answered with its name
        return json.dumps({"type": name}), lambda m: m.get("type") == "error" and name in m.get("message", "")
    return json.dumps({"type": "ping", "id": name}), lambda m: m.get("type") == "pong" and m.get("id") == name


async def send_post_hello(protocol: str, index: int, version: int, frames: list[str | bytes],
                          expected: list[str | None]) -> dict[str, Any]:
    """One socket: hello, then the frames in batches, each closed by a marker.
    → the error codes the server sent, the ones the oracle expected, the
    session id, and how often the socket had to be reopened (closes)."""
    got: collections.Counter = collections.Counter()
    want = collections.Counter(c for c in expected if c is not None)
    closes: collections.Counter = collections.Counter()
    session_ids: set[str] = set()
    device = index + 1
    pos = 0
    marks = 0
    while pos < len(frames):
        ws = await open_ws(protocol, version, device)
        try:
            await ws.send(json.dumps(GOOD_HELLO[protocol]))
            hello = json.loads(await asyncio.wait_for(ws.recv(), 60))
            assert hello.get("type") in ("hello", "pong"), hello
            if hello.get("session_id"):
                session_ids.add(hello["session_id"])
            while pos < len(frames):
                batch = frames[pos:pos + BATCH]
                mark, seen = marker(protocol, marks)
                marks += 1
                for frame in batch:
                    await ws.send(frame)
                await ws.send(mark)
                if protocol == "xiaozhi":
                    got["protocol.unknown_type"] -= 1  # the marker's own error
                deadline = time.monotonic() + 60
                while True:
                    data = await asyncio.wait_for(ws.recv(), max(0.1, deadline - time.monotonic()))
                    if isinstance(data, bytes):
                        continue
                    msg = json.loads(data)
                    if msg.get("session_id") and msg.get("type") == "hello":
                        session_ids.add(msg["session_id"])
                    if msg.get("type") == "error" and str(msg.get("code", "")).startswith(ERROR_PREFIXES):
                        got[msg["code"]] += 1
                    if seen(msg):
                        break
                pos += len(batch)
            await ws.close()
            closes[ws.close_code] += 1
        except ConnectionClosed:
            closes[ws.close_code] += 1  # the server ended it: start again after the batch it broke on
            pos += BATCH
        finally:
            await ws.close()
    return {"got": +got, "want": want, "closes": closes, "sessions": session_ids}


async def fuzz_protocol(protocol: str, corpus: dict[str, Any]) -> dict[str, Any]:
    started = time.monotonic()
    pre_closes = await send_pre_hello(protocol, corpus["pre"])
    pre_s = time.monotonic() - started
    results = await asyncio.gather(*(send_post_hello(protocol, i, *spec) for i, spec in corpus["post"].items()))
    return {"pre_closes": pre_closes, "post": results, "seconds": time.monotonic() - started, "pre_seconds": pre_s,
            "messages": len(corpus["pre"]) + sum(len(spec[1]) for spec in corpus["post"].values())}


# ------------------------------------------------------------------ tests
def test_corpus_is_seeded_and_malformed(fuzz_config) -> None:
    a = build_corpus("xiaozhi", fuzz_config, n=400)
    b = build_corpus("xiaozhi", fuzz_config, n=400)
    assert a["pre"] == b["pre"] and a["post"] == b["post"]
    for protocol in ROUTES:
        corpus = build_corpus(protocol, fuzz_config, n=1000)
        post = [c for spec in corpus["post"].values() for c in spec[2]]
        assert len(corpus["pre"]) + len(post) >= 1000
        assert sum(c is not None for c in post) > 0.7 * len(post), "mostly refused input"


REFUSED_JSON = ("protocol.bad_json", "protocol.too_deep")
"""An unclosed document nested ~1,000 deep is either, depending on how much
stack the caller has left when the C scanner recurses (safe_json maps its
RecursionError to too_deep, its syntax error to bad_json): both refusals."""


def merged(codes: collections.Counter) -> collections.Counter:
    out = collections.Counter({k: v for k, v in codes.items() if k not in REFUSED_JSON})
    out["/".join(REFUSED_JSON)] = sum(codes[k] for k in REFUSED_JSON)
    return out


async def test_malformed_messages_over_real_sockets(server, fuzz_config) -> None:
    """All three protocols at once (the proxy and the replica share two cores;
    overlapping them is faster than one after another)."""
    from actors.sessions import find_session

    corpora = {protocol: build_corpus(protocol, fuzz_config) for protocol in ROUTES}
    before = actor_pids()
    started = time.monotonic()
    results = dict(zip(corpora, await asyncio.gather(*(fuzz_protocol(p, c) for p, c in corpora.items()))))
    elapsed = time.monotonic() - started
    after = actor_pids()

    died = {k: v for k, v in before.items() if after.get(k) != v and k not in exited_on_purpose()}
    assert not died, f"actors died or restarted during the fuzz: {died}"
    # (actors from before it are checked above: an earlier module may have restarted a pool on purpose)
    restarted = {k: v for k, v in after.items() if v[2] and k not in before}
    assert not restarted, f"actors restarted: {restarted}"
    print(f"\n[fuzz] {sum(r['messages'] for r in results.values())} messages in {elapsed:.1f} s; "
          f"{len(before)} actors (Serve controller, proxy, replica, directory, pools, warm sessions) kept their PIDs; "
          f"{len(after) - len(before)} started during it (sessions), none restarted")
    failures = []
    for protocol, result in results.items():
        sessions = set().union(*(r["sessions"] for r in result["post"]))
        for sid in sessions:  # every fuzzed session is still there and answers
            actor = await find_session(fuzz_config, sid)
            assert actor is not None, sid
            await asyncio.wait_for(actor.history.remote(), 30)
        got = sum((r["got"] for r in result["post"]), collections.Counter())
        want = sum((r["want"] for r in result["post"]), collections.Counter())
        post_closes = sum((r["closes"] for r in result["post"]), collections.Counter())
        pre = len(corpora[protocol]["pre"])
        print(f"[fuzz {protocol}] {result['messages']} messages in {result['seconds']:.1f} s "
              f"({pre} pre-hello sockets: {result['pre_seconds']:.1f} s); pre-hello closes "
              f"{dict(result['pre_closes'])}; post-hello closes {dict(post_closes)}; sessions {len(sessions)}; "
              f"errors {dict(got.most_common())}")
        if result["messages"] < N_MESSAGES:
            failures.append(f"{protocol}: only {result['messages']} messages")
        if not set(result["pre_closes"]) <= {4400, 1009} or sum(result["pre_closes"].values()) != pre:
            failures.append(f"{protocol}: pre-hello closes {dict(result['pre_closes'])}")
        if set(post_closes) != {1000}:  # after the hello nothing may close a socket
            failures.append(f"{protocol}: post-hello closes {dict(post_closes)}")
        if merged(got) != merged(want):
            failures.append(f"{protocol}: server sent {dict(got)}, the adapter refuses {dict(want)}")
    assert not failures, failures

    # a normal turn afterwards, on fresh sockets
    async with await NativeClient.connect(f"{WS}/ws/voice") as client:
        turn = await client.ask_text("What is twelve times seven?", timeout_s=60)
    assert "84" in turn.reply and not turn.errors, (turn.reply, turn.errors)
    async with await open_ws("text") as ws:
        await ws.send(json.dumps({"type": "text", "text": "What is twelve times seven?"}))
        reply = ""
        while True:
            msg = json.loads(await asyncio.wait_for(ws.recv(), 60))
            assert msg.get("type") != "error", msg
            reply += msg.get("text", "") if msg.get("type") == "llm.delta" else ""
            if msg.get("type") == "metrics":
                break
    assert "84" in reply, reply


async def test_bad_xiaozhi_connect_headers_close_cleanly(server) -> None:
    closes = collections.Counter()
    for version in ("4", "0", "abc", "-1", "2" * 30):
        closes[await close_code_after("xiaozhi", version, None, 2000)] += 1
    async with await connect(WS + "/xiaozhi/v1/", additional_headers={"Protocol-Version": "1"}, proxy=None) as ws:
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 20)
        closes[ws.close_code] += 1
    assert closes == {4400: 6}, closes

