#!/bin/sh
# System packages some tests use, installed when missing and this machine lets us
# (root with apt-get). Without them those tests skip (the browser tests fail), naming what is missing.
#   postgresql: tests/test_memory.py and tests/test_shared_store.py run the memory and session
#               stores against a real server they start (tests/pg.py).
#   chromium: tests/test_web_page*.py (page, login, cloud) drive the browser voice page,
#     tests/test_admin_panel.py the control panel, in headless Chromium (these tests fail without it
#     unless VA_ALLOW_NO_BROWSER=1); fonts-wqy-microhei (1.6 MB) draws the Chinese text on the
#     page and in its screenshot.
set -u
missing=""
if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    missing="$missing postgresql"
fi
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
    missing="$missing chromium"
fi
if ! command -v fc-list >/dev/null 2>&1 || [ -z "$(fc-list :lang=zh 2>/dev/null)" ]; then
    missing="$missing fonts-wqy-microhei"
fi
[ -z "$missing" ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing:$missing" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null) \
        || echo "could not install$missing; the tests that need it will skip or fail, naming it" >&2
else
    echo "not installed:$missing (needs root and apt-get); the tests that need it will skip or fail, naming it" >&2
fi
exit 0
