"""How the server's Ray workers run Python: on bytecode cached in this
user's private directory, with two malloc arenas, no column positions and
Ray's unused imports deferred, session workers with a lean serialization
context, and, when asked, session workers without docstrings.

Bytecode, for every worker of a node the server starts itself. Hosts
(containers, this project's machines) often set `PYTHONDONTWRITEBYTECODE`,
and an editable install has no `.pyc` beside its sources, so every Ray
worker compiled the server's modules from source on each start. A node the
server starts (`connect_ray` with no cluster running) gets
`PYTHONPYCACHEPREFIX` in the environment its raylet inherits, and every
worker it starts writes and then reads `.pyc` files there: a session
worker's cold start 0.41 → 0.31 s and 0.62 → 0.48 s of its CPU
(`python -m bench.worker_memory`). The raylet's inherited environment is
the one way a setting reaches every worker without a `runtime_env`.

Two malloc arenas, for every process of a node the server starts (unless
the host set `MALLOC_ARENA_MAX` itself). glibc gives each thread that
allocates an arena of its own, up to 8 per core, and a Ray worker has a
dozen threads (Ray's I/O, gRPC and task threads, the event loop, the VAD's
loader, SQLite's): what they free stays spread over arenas that are never
given back whole. Two hold the same: a live session actor 65.0 → 63.1 MB,
and no CPU cost measured at 32 devices (docs/benchmarks.md, "Where a
session worker's memory goes").

No column positions in code objects, for every process of a node the
server starts (`PYTHONNODEBUGRANGES`, unless the host set it): Python 3.11
keeps, for every instruction of every module loaded, where on its line it
came from, for the carets under a traceback's line; without them a live
session actor is ~0.4 MB smaller (docs/benchmarks.md, "A session worker
under 60 MB by default"). Tracebacks still name the file and line.

Ray's unused imports deferred, in every Ray worker of a node the server
starts (unless the host set `VOICE_ACTORS_DEFERRED_IMPORTS` itself, empty
for none): `requests`, `jsonschema` and `wcwidth`, which Ray imports at its
top for features a session never uses, run only if something reads them
(actors/deferred_imports.py): a live session actor ~6.5 MB smaller. The
node's `PYTHONPATH` starts with actors/worker_site, whose `sitecustomize`
does it before Ray is imported, the one moment it can be done.

Session workers without docstrings (`server.optimize_session_workers`, off
by default). `PYTHONOPTIMIZE=2` drops ~820 modules' docstrings: a live
session actor 65.8 → 59.0 MB. It cannot be set for the whole node (Ray's
own agents fail without docstrings), so it needs the session actors' own
`runtime_env`, and any `runtime_env` makes the raylet start the worker
through Ray's setup shim, a second interpreter that imports all of Ray:
each session worker's cold start 0.31 → 0.85 s and its CPU 0.48 → 0.74 s.
At 32 sessions on 2 cores that put the warm pool's refill into live turns
(item 2's p99 78–141 ms against 57–123 plain) and a burst of 32 new
devices waited ~200 ms for hello against ~30 (docs/benchmarks.md, "Session
workers' own runtime_env"). So it is for nodes short of memory rather than
CPU. An optimised interpreter reads only `.opt-2.pyc` files, kept under the
same prefix.

The directory must be private: a `.pyc` there runs in every worker.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from actors.private_dir import private_dir

if TYPE_CHECKING:  # not imported for it: a session worker calls `lean_serialization_context` before its config
    from actors.config import AppConfig


def bytecode_cache() -> Path | None:
    """This user's bytecode directory on this node, made 0700 if missing;
    None when there is no private directory for it. Bytecode compiled
    without column positions has a directory of its own: a `.pyc` does not
    say which it holds, and Python reads whichever it finds."""
    base = private_dir("cached bytecode")
    if base is None:
        return None
    cache = base / ("bytecode-no-debug-ranges" if os.environ.get("PYTHONNODEBUGRANGES") else "bytecode")
    cache.mkdir(mode=0o700, exist_ok=True)
    return cache


MALLOC_ARENAS = "2"

DEFERRED_IMPORTS = "requests,jsonschema,wcwidth"
"""What a node's Ray workers import only when read (actors/deferred_imports.py)."""

DEFERRED_IMPORTS_ENV = "VOICE_ACTORS_DEFERRED_IMPORTS"
"""The variable naming them, which worker_site/sitecustomize.py reads."""

WORKER_SITE = Path(__file__).resolve().parent / "worker_site"
"""The directory whose `sitecustomize` defers them in a Ray worker."""


def put_first_on_pythonpath(directory: Path) -> None:
    """`directory` first on this process's `PYTHONPATH` (what a node started
    from it inherits), once however often this runs; the rest kept in order."""
    rest = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(directory)]
    os.environ["PYTHONPATH"] = os.pathsep.join([str(directory), *rest])


def prepare_this_node() -> None:
    """Before this process starts a Ray node: the raylet, and every worker it
    starts, inherit this process's environment (two malloc arenas; code
    without column positions; Ray's unused imports deferred; the bytecode
    cache when there is a private directory for it), each unless the host
    chose otherwise."""
    os.environ.setdefault("MALLOC_ARENA_MAX", MALLOC_ARENAS)
    os.environ.setdefault("PYTHONNODEBUGRANGES", "1")
    os.environ.setdefault(DEFERRED_IMPORTS_ENV, DEFERRED_IMPORTS)
    put_first_on_pythonpath(WORKER_SITE)
    cache = bytecode_cache()
    if cache is None:
        return
    os.environ["PYTHONPYCACHEPREFIX"] = str(cache)
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)


UNSENT_BY_SESSIONS = ("starlette", "pydantic.v1")
"""Packages Ray's serialization context imports, in every worker, only to
register a serializer for one of their types (starlette's `State`,
pydantic v1's `ModelField`: ray/util/serialization_addons.py); a session
never sends either."""


def lean_serialization_context() -> None:
    """Build this Ray worker's serialization context now, without importing
    `UNSENT_BY_SESSIONS` for it (each is hidden from import while Ray builds
    it, then importable as usual). Ray builds it on a worker's first
    argument, whatever its type, so a session actor calls this first in its
    `__init__`, which takes no argument for that reason: 1.9 MB a session
    (docs/benchmarks.md, "A session worker under 60 MB by default"). A worker
    that has built it already, or imported them, is left as it is."""
    import ray._private.worker

    worker = ray._private.worker.global_worker
    if worker.mode != ray._private.worker.WORKER_MODE:
        return
    hidden = [name for name in UNSENT_BY_SESSIONS if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]  # import raises ImportError, which Ray expects
    try:
        worker.get_serialization_context()
    finally:
        for name in hidden:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]


def session_runtime_env(config: AppConfig) -> dict[str, Any] | None:
    """The `runtime_env` a new session actor starts with; None (the job's
    own) when `server.optimize_session_workers` is off or no private
    directory exists for the bytecode. Ray merges these variables into the
    job's, so a `PYTHONPATH` given to the job still reaches the worker."""
    if not config.server.optimize_session_workers:
        return None
    cache = bytecode_cache()
    if cache is None:
        return None
    return {"env_vars": {
        "PYTHONOPTIMIZE": "2",
        "PYTHONPYCACHEPREFIX": str(cache),
        "PYTHONDONTWRITEBYTECODE": "",  # empty is unset to Python: write the cache
        "MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX", MALLOC_ARENAS),
    }}
