"""The one way browser tests find Chromium: Debian's `chromium` driven by
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
