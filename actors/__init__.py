"""voice-actors: a real-time voice assistant as an actor system on Ray.

Notebook entry points: `SessionHandle.open()` / `await SessionHandle.aopen()`
(a session actor you can talk to with text or audio) and `load_config()`;
docs/notebook.ipynb shows them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from actors.config import AppConfig, load_config
    from actors.notebook import SessionHandle
    from actors.session_manager import SessionManager
    from actors.sessions import TurnResult, TurnResults

__all__ = ["AppConfig", "load_config", "SessionHandle", "SessionManager", "TurnResult", "TurnResults"]

# Loaded on first use (PEP 562), not with the package: every process that
# imports any `actors.*` module (each session actor, each pool) would
# otherwise load the notebook and client side too.
_LAZY = {"AppConfig": "actors.config", "load_config": "actors.config", "SessionHandle": "actors.notebook",
         "SessionManager": "actors.session_manager", "TurnResult": "actors.sessions", "TurnResults": "actors.sessions"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
