"""Python runs this at start-up in every process of a node the server
starts: actors/worker_env.py `prepare_this_node` puts this directory first
on the node's `PYTHONPATH`. In a Ray worker, before Ray is imported, it
defers the modules `VOICE_ACTORS_DEFERRED_IMPORTS` names (comma-separated;
actors/deferred_imports.py says why); in any other process it defers
nothing. Then it runs the `sitecustomize` it hides, if there is one.
"""

import importlib.machinery
import importlib.util
import os
import sys

# worker_env.DEFERRED_IMPORTS_ENV, not imported from there: outside a worker this imports nothing of ours
DEFERRED_IMPORTS_ENV = "VOICE_ACTORS_DEFERRED_IMPORTS"
RAY_WORKER_SCRIPT = "default_worker.py"  # ray/_private/workers/: what the raylet runs for every worker


def _defer_in_a_ray_worker() -> None:
    names = [name.strip() for name in os.environ.get(DEFERRED_IMPORTS_ENV, "").split(",") if name.strip()]
    if not names or not sys.argv or os.path.basename(sys.argv[0]) != RAY_WORKER_SCRIPT:
        return
    try:
        from actors.deferred_imports import defer

        defer(names)
    except Exception as exc:  # the worker runs as it would without: every import eager
        print(f"voice-actors: imports not deferred in this worker: {exc!r}", file=sys.stderr)


def _run_the_hidden_sitecustomize() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["sitecustomize"] = module
    spec.loader.exec_module(module)


_defer_in_a_ray_worker()
_run_the_hidden_sitecustomize()
