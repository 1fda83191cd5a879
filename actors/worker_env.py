"""How a session actor's Python runs: without docstrings, on cached bytecode,
with two malloc arenas.

Every session is its own Ray worker process, so whatever each one holds is
paid once per session. ~820 modules' docstrings are ~5 MB of a session
process (bench/worker_memory.py), and `PYTHONOPTIMIZE=2` drops them (and
`assert`s, which the session's code uses for invariants only, never to
check input). An optimised interpreter reads only `.opt-2.pyc` files,
though, which nothing writes by default: pip writes plain `.pyc`, Ray's
workers inherit `PYTHONDONTWRITEBYTECODE` where the host sets it, and
site-packages may not be the server user's to write. Without them every
cold start compiles every module from source (+1.3 s of CPU, what a burst
of new devices waits for). So session workers keep their bytecode under
this user's private directory (`PYTHONPYCACHEPREFIX`): the first session
on a node writes it, every later one reads it, and Python checks each file
against its source's size and time as it does beside the source.

The directory must be private: a `.pyc` there runs in every session.

A live session's threads (its event loop, Ray's task and I/O threads, the
VAD's loader) each took a malloc arena of their own; two hold the same
for ~1 MB less (measured with `python -m bench.run`: live session actor
59.0 against 60.1 MB, CPU per session and latencies alike).
"""

from __future__ import annotations

from typing import Any

from actors.config import AppConfig
from actors.private_dir import private_dir


def session_runtime_env(config: AppConfig) -> dict[str, Any] | None:
    """The `runtime_env` a new session actor starts with; None (the job's
    own) when `server.optimize_session_workers` is off or no private
    directory exists for the bytecode. Ray merges these variables into the
    job's, so a `PYTHONPATH` given to the job still reaches the worker."""
    if not config.server.optimize_session_workers:
        return None
    base = private_dir("optimised session workers")
    if base is None:
        return None
    cache = base / "bytecode"
    cache.mkdir(mode=0o700, exist_ok=True)
    return {"env_vars": {
        "PYTHONOPTIMIZE": "2",
        "PYTHONPYCACHEPREFIX": str(cache),
        "PYTHONDONTWRITEBYTECODE": "",  # empty is unset to Python: write the cache
        "MALLOC_ARENA_MAX": "2",
    }}
