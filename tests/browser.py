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
