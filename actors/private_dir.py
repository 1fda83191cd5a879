"""This user's private directory on this node, for what only the server's own
processes may touch: session channel sockets (actors/session_channel.py) and
the session workers' bytecode (actors/worker_env.py).

Private is checked, not assumed: `/tmp` is shared, so another user may have
made the directory first, or left it open. Whoever can enter it could talk to
a session's channel; whoever can write in it could plant bytecode that every
session worker would run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


def private_dir(purpose: str) -> Path | None:
    """`$TMPDIR/voice-actors-<uid>`, made 0700 if missing; None (and a
    warning naming `purpose`, what goes without it) when it is not a
    directory of this user's that no one else may enter."""
    path = Path(tempfile.gettempdir()) / f"voice-actors-{os.getuid()}"
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        log.warning("%s off: %s is not a private directory of this user", purpose, path)
        return None
    return path
