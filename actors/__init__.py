"""voice-actors: a real-time voice assistant as an actor system on Ray.

Notebook entry points: `SessionHandle.open()` / `await SessionHandle.aopen()`
(a session actor you can talk to with text or audio) and `load_config()`;
docs/notebook.ipynb shows them.
"""

from actors.config import AppConfig, load_config
from actors.notebook import SessionHandle
from actors.sessions import SessionManager, TurnResult, TurnResults

__all__ = ["AppConfig", "load_config", "SessionHandle", "SessionManager", "TurnResult", "TurnResults"]
