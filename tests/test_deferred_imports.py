"""actors/deferred_imports.py and actors/worker_site/sitecustomize.py: a
deferred module runs on its first read, once, in whichever thread; what
the import system reads does not run it; a Ray worker of a node the server
starts defers Ray's unused imports and can still use them. Each case runs
in a fresh interpreter: deferring is for a whole process, before imports."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from actors.worker_env import WORKER_SITE

PROBE = """\
import pathlib, sys, time
DOC = sys.modules[__name__].__doc__  # a module reading itself as it runs
here = pathlib.Path(__file__)
with here.with_suffix(".ran").open("a") as marker:
    marker.write("ran\\n")
if here.with_suffix(".delay").exists():
    time.sleep(float(here.with_suffix(".delay").read_text()))
VALUE = 42
"""


def run(tmp_path: Path, code: str, *, script: str = "main.py", env: dict[str, str] | None = None) -> str:
    main = tmp_path / script
    main.write_text(textwrap.dedent(code))
    done = subprocess.run([sys.executable, str(main)], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(tmp_path), **(env or {})})
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def runs(tmp_path: Path, name: str = "probe") -> int:
    marker = tmp_path / f"{name}.ran"
    return len(marker.read_text().splitlines()) if marker.exists() else 0


def test_a_deferred_module_runs_on_its_first_read_and_not_when_imported_again(tmp_path):
    (tmp_path / "probe.py").write_text(PROBE)
    out = run(tmp_path, """
        from actors.deferred_imports import defer
        defer(["probe"])
        import probe
        import probe  # imported again: Python reads its __spec__
        import importlib.util, pathlib
        assert importlib.util.find_spec("probe") is probe.__spec__
        print(repr(probe), probe.__name__, pathlib.Path(probe.__file__).name)
        print("before the first read", pathlib.Path("probe.ran").exists())
        print(probe.VALUE)
        from probe import VALUE
        print(VALUE, type(probe).__name__, type(probe.__loader__).__name__, type(probe.__spec__.loader).__name__)
    """)
    assert out.splitlines()[1:] == ["before the first read False", "42",
                                    "42 module SourceFileLoader SourceFileLoader"], out
    assert runs(tmp_path) == 1
    assert "probe.py" in out.splitlines()[0]


def test_threads_reading_it_at_once_wait_for_one_run(tmp_path):
    (tmp_path / "probe.py").write_text(PROBE)
    (tmp_path / "probe.delay").write_text("0.3")
    out = run(tmp_path, """
        import threading
        from actors.deferred_imports import defer
        defer(["probe"])
        import probe
        seen = []
        threads = [threading.Thread(target=lambda: seen.append(probe.VALUE)) for _ in range(8)]
        for t in threads: t.start()
        for t in threads: t.join()
        print(seen)
    """)
    assert out == str([42] * 8)
    assert runs(tmp_path) == 1


def test_a_module_that_fails_raises_its_error_on_the_read_and_can_be_imported_again(tmp_path):
    (tmp_path / "probe.py").write_text("raise RuntimeError('broken install')\n")
    out = run(tmp_path, """
        import pathlib, sys
        from actors.deferred_imports import defer
        defer(["probe"])
        import probe
        try:
            probe.VALUE
        except RuntimeError as exc:
            print("raised", exc, "probe" in sys.modules)
        pathlib.Path("probe.py").write_text("VALUE = 7\\n")
        import importlib; importlib.invalidate_caches()
        import probe
        print(probe.VALUE)
    """)
    assert out.splitlines() == ["raised broken install False", "7"]


def test_a_submodule_import_runs_its_package_first_and_native_modules_are_not_deferred(tmp_path):
    package = tmp_path / "probepkg"
    package.mkdir()
    (package / "__init__.py").write_text("import pathlib; pathlib.Path('probepkg.ran').write_text('ran\\n')\n")
    (package / "sub.py").write_text("from . import __name__ as parent\nVALUE = 1\n")
    out = run(tmp_path, """
        import pathlib
        from actors.deferred_imports import defer
        defer(["probepkg", "math", "json"])
        import probepkg, math
        print(pathlib.Path("probepkg.ran").exists(), type(math).__name__)
        import probepkg.sub
        print(pathlib.Path("probepkg.ran").exists(), probepkg.sub.VALUE)
    """)
    assert out.splitlines() == ["False module", "True 1"]


def test_the_node_site_defers_only_in_a_ray_worker_and_runs_the_sitecustomize_it_hides(tmp_path):
    (tmp_path / "probe.py").write_text(PROBE)
    (tmp_path / "sitecustomize.py").write_text("import pathlib; pathlib.Path('hidden.ran').write_text('ran')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(WORKER_SITE), str(tmp_path)]),
           "VOICE_ACTORS_DEFERRED_IMPORTS": "probe, json"}
    check = """
        import sys, pathlib
        import probe
        print(type(sys.modules["probe"]).__name__, pathlib.Path("hidden.ran").exists())
    """
    assert run(tmp_path, check, script="default_worker.py", env=env) == "DeferredModule True"
    assert run(tmp_path, check, script="serve.py", env=env) == "module True", "not a Ray worker: nothing deferred"
    assert run(tmp_path, check, script="default_worker.py",
               env={**env, "VOICE_ACTORS_DEFERRED_IMPORTS": ""}) == "module True", "the host turned it off"


def test_a_ray_worker_of_a_node_the_server_starts_defers_rays_unused_imports_and_can_use_them(ray_cluster):
    """The test session's node is started as the server's (tests/conftest.py)."""
    import ray

    @ray.remote(num_cpus=0)
    class Worker:  # an actor: a worker of its own, which no earlier test's code has read them in
        def check(self) -> tuple[dict[str, str], int, bool]:
            import sys

            from actors.worker_env import DEFERRED_IMPORTS

            kinds = {name: type(sys.modules[name]).__name__ for name in DEFERRED_IMPORTS.split(",")
                     if name in sys.modules}
            import jsonschema
            import requests

            jsonschema.validate({"a": 1}, {"type": "object"})
            return kinds, requests.codes.ok, type(sys.modules["requests"]).__name__ == "module"

    worker = Worker.remote()
    kinds, ok, ran = ray.get(worker.check.remote())
    ray.kill(worker)
    assert kinds == {"requests": "DeferredModule", "jsonschema": "DeferredModule", "wcwidth": "DeferredModule"}
    assert ok == 200 and ran
