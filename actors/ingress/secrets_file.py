"""Signing secrets that outlive a restart of `voice-actors serve`.

Unset secrets used to be made afresh on every start, so every device token
(valid 30 days) and every user token died with the process. When the
configuration gives none, they are made once and kept in a file readable by
its owner only (mode 600), outside git (`data/` is ignored).
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

MIN_SECRET_CHARS = 32


def load_or_create(path: Path, names: list[str]) -> dict[str, str]:
    """The named secrets from `path`, made and saved first where missing or too short."""
    data: dict[str, str] = {}
    if path.exists():
        try:
            loaded = json.loads(path.read_text())
        except (OSError, ValueError):
            loaded = {}
        data = {k: v for k, v in loaded.items() if isinstance(v, str)} if isinstance(loaded, dict) else {}
    missing = [n for n in names if len(data.get(n, "")) < MIN_SECRET_CHARS]
    for name in missing:
        data[name] = secrets.token_urlsafe(32)
    if missing or not path.exists():
        _write_private(path, json.dumps(data, indent=1))
    elif path.stat().st_mode & 0o077:
        path.chmod(0o600)  # someone loosened it: only the owner reads signing secrets
    return {n: data[n] for n in names}


def _write_private(path: Path, text: str) -> None:
    """Write through a new mode-600 file and rename it into place, so the
    secrets are never readable by others, not even for a moment."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)
