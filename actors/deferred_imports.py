"""Modules a Ray worker imports but never reads, run only when first read.

Ray's own modules import, at their top, three packages for features a
voice session never uses: `requests` (the TPU metadata probe,
ray/_private/accelerators/tpu.py, and the state API), `jsonschema`
(runtime-env plugin schemas) and `wcwidth` (East Asian column widths for
the tables Ray's CLI prints). With what they pull in (urllib3, charset
detection, idna, attrs, referencing) that is ~200 modules, and ~6.5 MB of
every session worker (docs/benchmarks.md, "Ray's unused imports,
deferred"). `defer(names)`, run in a worker before Ray is imported
(actors/worker_site/sitecustomize.py), makes `import name` bind a module
whose code runs the first time anything is read from it: code that uses
one works as before, a little later.

Only a module imported whole and read inside functions gains anything: a
`from name import x` reads `x` at once, and importing a submodule reads the
package's `__path__`. That is why `yaml` and `filelock`, which Ray also
imports at its top, are not deferred (and a session reads `yaml` anyway).

Not `importlib.util.LazyLoader`: its modules run on any attribute read,
and Python reads `__spec__` each time a module already imported is
imported again, so Ray's second `import requests` ran it. A deferred module
answers what the import system reads without running.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import threading
import types
from collections.abc import Iterable
from typing import Any

READ_WITHOUT_RUNNING = frozenset({"__spec__", "__name__", "__loader__", "__package__", "__file__", "__cached__",
                                  "__class__", "__dict__"})
"""What the import system and a module's repr read: a deferred module
answers these without running its code."""


class DeferredModule(types.ModuleType):
    """A module whose code has not run yet: reading anything but
    `READ_WITHOUT_RUNNING` runs it first, once, whichever thread reads."""

    def __getattribute__(self, attr: str) -> Any:
        if attr in READ_WITHOUT_RUNNING:
            return types.ModuleType.__getattribute__(self, attr)
        loader = types.ModuleType.__getattribute__(self, "__spec__").loader
        if isinstance(loader, DeferringLoader):
            loader.run(self)
        return types.ModuleType.__getattribute__(self, attr)


class DeferringLoader(importlib.abc.Loader):
    """Wraps a module's real loader: an import binds the module with nothing
    run; its first read runs the real loader's code (`run`)."""

    def __init__(self, real: importlib.abc.Loader) -> None:
        self.real = real
        self._lock = threading.RLock()  # re-entered by the thread running the module's own code
        self._running = False

    def __getattr__(self, name: str) -> Any:  # is_package, get_code, get_resource_reader, ...
        return getattr(self.real, name)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None  # the default module, whose class can change

    def exec_module(self, module: types.ModuleType) -> None:
        module.__class__ = DeferredModule

    def run(self, module: types.ModuleType) -> None:
        """Run the module's code unless it has run or is running in this
        thread (its own code reads its module as it fills it); another
        thread waits for it to finish."""
        with self._lock:
            if self._running or type(module) is not DeferredModule:
                return
            self._running = True
            try:
                self.real.exec_module(module)  # type: ignore[attr-defined]
            except BaseException:
                sys.modules.pop(module.__name__, None)  # a later import tries again, as after a failed import
                raise
            finally:
                self._running = False
            spec = types.ModuleType.__getattribute__(module, "__spec__")
            spec.loader = self.real
            module.__loader__ = self.real
            module.__class__ = types.ModuleType


class DeferringFinder(importlib.abc.MetaPathFinder):
    """First on `sys.meta_path`: finds `names` with the finders after it and
    defers those that are Python source; leaves every other module alone."""

    def __init__(self, names: Iterable[str]) -> None:
        self.names = frozenset(names)

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name not in self.names:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(name, path, target)
            if spec is None:
                continue
            if isinstance(spec.loader, importlib.machinery.SourceFileLoader):
                spec.loader = DeferringLoader(spec.loader)
            return spec
        return None


def defer(names: Iterable[str]) -> None:
    """From now on, `import name` for each of `names` not yet imported binds
    a `DeferredModule`. Once per process: a second call adds nothing."""
    if any(isinstance(finder, DeferringFinder) for finder in sys.meta_path):
        return
    sys.meta_path.insert(0, DeferringFinder(name for name in names if name not in sys.modules))
