"""Helpers of the browser tests. The one way they find Chromium: Debian's `chromium` driven by
Playwright through `executable_path` (Playwright's own download is blocked).
A missing browser fails the test, naming what is missing, unless
VA_ALLOW_NO_BROWSER=1 (then it skips, saying so): CI must never skip silently."""

from __future__ import annotations

import os
import shutil

import pytest

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _missing(what: str) -> None:
    if os.environ.get("VA_ALLOW_NO_BROWSER") == "1":
        pytest.skip(f"browser tests skipped (VA_ALLOW_NO_BROWSER=1): {what}")
    pytest.fail(f"the browser tests need {what}; install it (sh tests/system-deps.sh; pip install -e '.[test]') "
                "or set VA_ALLOW_NO_BROWSER=1 to skip them", pytrace=False)


def find_chromium() -> str:
    """Chromium's path ($VA_CHROMIUM, else the first on PATH), with Playwright importable."""
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        _missing("the Python package playwright (the `test` extra)")
    path = os.environ.get("VA_CHROMIUM") or next(filter(None, map(shutil.which, CHROMIUM_NAMES)), None)
    if not path or not os.access(path, os.X_OK):
        _missing(f"a Chromium browser{f' (VA_CHROMIUM={path} is not one)' if path else ''} "
                 "(Debian: apt-get install chromium; or VA_CHROMIUM=/path/to/chrome)")
    assert path is not None
    return path


async def wait_for_js(page, predicate: str, arg=None, timeout_ms: float = 30_000, poll_ms: float = 100):
    """Poll a JavaScript function of `arg` until it returns a truthy value; → that value.

    Playwright's `wait_for_function` runs its predicate through the page's own
    `eval`, which our pages' Content-Security-Policy (`script-src 'self'`)
    forbids in newer Chromium builds; `page.evaluate` goes through the DevTools
    protocol instead, which the CSP does not govern. A navigation between polls
    (the page reloading itself) is waited out, not failed on."""
    import asyncio
    import time

    from playwright.async_api import Error as PlaywrightError

    deadline = time.monotonic() + timeout_ms / 1000
    last_error = ""
    while True:
        try:
            value = await page.evaluate(predicate, arg)
            if value:
                return value
        except PlaywrightError as e:  # "Execution context was destroyed" during a navigation
            if "context" not in str(e).lower() and "navigat" not in str(e).lower():
                raise
            last_error = str(e)
        if time.monotonic() > deadline:
            raise TimeoutError(f"{predicate!r} stayed false for {timeout_ms:.0f} ms"
                               + (f" (last error: {last_error})" if last_error else ""))
        await asyncio.sleep(poll_ms / 1000)


# ------------------------------------------------------------------ the voice page (web/voice.js)
# Its recordings live in `window.voiceTest`, which only a page opened with ?test=1 has (web/test-hook.js).
TEST_FLAG = "/?test=1"


async def connect(pg) -> dict:
    """Press Connect; → the server's `hello`."""
    await pg.click("#connect")
    await wait_for_js(pg, "() => window.voiceTest.state.connected")
    return await pg.evaluate("window.voiceTest.hellos.at(-1)")


async def events(pg) -> list[dict]:
    return await pg.evaluate("window.voiceTest.events")


async def wait_turn_done(pg, after: int = 0, spoken: bool = False, timeout_ms: int = 90_000) -> int:
    """Wait for a turn's `metrics` (a spoken one: after its `stt.final`) among
    the events from index `after`; → its turn id."""
    return await wait_for_js(pg, """([after, spoken]) => {
        const evs = window.voiceTest.events.slice(after);
        const m = evs.find(e => e.type === 'metrics' && (!spoken ||
            evs.some(f => f.type === 'stt.final' && f.turn_id === e.turn_id)));
        return m ? m.turn_id : null;
    }""", [after, spoken], timeout_ms=timeout_ms)


async def turn_pcm(pg, turn_id: int):
    """The reply audio the page received for a turn, as int16 samples in a float64 array."""
    import numpy as np

    return np.asarray(await pg.evaluate("t => Array.from(window.voiceTest.turnPcm(t))", turn_id), dtype=np.float64)


def dbfs(samples) -> float:
    import numpy as np

    rms = float(np.sqrt(np.mean(np.square(samples / 32768.0)))) if len(samples) else 0.0
    return 20 * float(np.log10(max(rms, 1e-9)))


def text_of(evs: list[dict], type_: str, turn_id: int) -> str:
    return "".join(e.get("text", "") for e in evs if e["type"] == type_ and e.get("turn_id") == turn_id)


async def type_question(pg, text: str) -> int:
    """Type a line and send it; → the number of events before it (for `wait_turn_done(after=)`)."""
    before = len(await events(pg))
    await pg.fill("#text-input", text)
    await pg.press("#text-input", "Enter")
    return before


async def wait_playing(pg, seconds: float, timeout_ms: int = 60_000) -> None:
    """Until the page has played `seconds` of the reply and more is still scheduled."""
    await wait_for_js(pg, "s => window.voiceTest.playedSamples > s * window.voiceTest.state.outputRate"
                      " && window.voiceTest.activeSources > 0", seconds, timeout_ms=timeout_ms, poll_ms=50)


class TcpRelay:
    """A TCP relay on 127.0.0.1 to `target_port` that the test can cut like a
    network failure: `cut()` resets every relayed connection (the browser sees
    an abnormal close, 1006, not a close handshake) and, while `down`, new
    connections are reset at once. Playwright's `set_offline` leaves open
    WebSockets alone, so a real drop needs a middleman."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.down = False
        self.port = 0
        self._server = None
        self._links: set = set()

    async def __aenter__(self) -> TcpRelay:
        import asyncio

        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cut()
        self._server.close()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cut(self) -> int:
        """Reset every open connection (TCP RST, no FIN); → how many were relayed."""
        import socket
        import struct

        links, self._links = self._links, set()
        for writer in links:
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        return len(links) // 2

    async def _relay(self, reader, writer) -> None:
        import asyncio

        if self.down:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._links |= {writer, up_writer}

        async def pipe(src, dst) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                self._links.discard(dst)
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
