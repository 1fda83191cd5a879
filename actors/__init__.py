"""voice-actors: a real-time voice assistant as an actor system on Ray.

Notebook entry points: `SessionHandle.open()` (a session actor you can talk
to with text or audio) and `load_config()`.
"""

from actors.config import AppConfig, load_config
from actors.sessions import SessionHandle, SessionManager, TurnResult

__all__ = ["AppConfig", "load_config", "SessionHandle", "SessionManager", "TurnResult"]
