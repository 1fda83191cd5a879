"""DashScope (Alibaba Cloud Model Studio) realtime providers: paraformer
speech recognition (`stt.py`) and CosyVoice speech synthesis (`tts.py`).

Both talk to DashScope through the official `dashscope` SDK, which has no
asyncio API: its callbacks run on SDK threads and several of its methods
block (provider-wire-facts.md §5). The helpers here are the glue both
modules share: a daemon thread that runs blocking SDK calls in order, a
thread-safe hop back to the event loop, and key resolution that names the
environment variable but never the key.

Nothing here imports the SDK (2 s to import), so the config models can be
imported by `actors.config` cheaply; the SDK loads when a provider is built.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel, SecretStr

from actors.providers.base import ProviderError
from actors.providers.registry import ProviderSpec

PROVIDERS = {
    # cloud clients: opened by the session itself (not pooled), so audio streams without an extra hop
    ("stt", "dashscope"): ProviderSpec("actors.providers.dashscope.stt:DashScopeSTT.from_app_config",
                                       section="dashscope",
                                       config_model="actors.providers.dashscope.stt:DashScopeSTTConfig"),
    ("tts", "dashscope"): ProviderSpec("actors.providers.dashscope.tts:DashScopeTTS.from_app_config",
                                       section="dashscope",
                                       config_model="actors.providers.dashscope.tts:DashScopeTTSConfig"),
}

log = logging.getLogger(__name__)

DEFAULT_API_KEY_ENV = "DASHSCOPE_API_KEY"

M = TypeVar("M", bound=BaseModel)


def resolve_api_key(explicit: SecretStr | None, env_var: str, kind: str, what: str) -> str:
    """The API key from the config, else from `env_var`.

    Raises ProviderError(`{kind}.no_api_key`) naming the variable (never a
    key) so an operator knows exactly what to set.
    """
    if explicit is not None and explicit.get_secret_value():
        return explicit.get_secret_value()
    key = os.environ.get(env_var, "").strip()
    if key:
        return key
    raise ProviderError(
        f"{kind}.no_api_key",
        f"DashScope {what} needs an API key: set the environment variable {env_var} "
        f"(or {kind}.dashscope.api_key in the configuration)",
    )


def section_config(config: Any, kind: str, model: type[M]) -> M:
    """`config.<kind>.dashscope` as `model`, whatever shape it arrives in.

    Accepts the model itself, another pydantic model or a dict with the same
    fields (the app config may declare its own copy), or nothing (defaults),
    so this module works before and after the app config grows the section.
    """
    section = getattr(getattr(config, kind, None), "dashscope", None)
    if section is None:
        return model()
    if isinstance(section, model):
        return section
    if isinstance(section, BaseModel):
        section = section.model_dump()
    return model.model_validate(section)


def post_to_loop(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> None:
    """Run `fn(*args)` on `loop` from an SDK thread.

    A late SDK callback may fire after the loop has closed (a test ended, the
    session went away); dropping it then is right, crashing the SDK thread is not.
    """
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        log.debug("event loop closed; dropped a DashScope callback")


class SerialWorker:
    """One daemon thread running blocking SDK calls in submission order.

    Why not `asyncio.to_thread`: calls to one SDK object must keep their order
    (start before the first audio frame, every frame before stop), which a
    thread pool does not promise. Why a daemon thread: a call stuck on a silent
    server must not keep the process from exiting (ThreadPoolExecutor threads
    are joined at exit).
    """

    _STOP = object()

    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future[Any]:
        """Queue `fn(*args)`; `await asyncio.wrap_future(...)` the result if needed."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._calls.put((future, fn, args))
        return future

    def close(self) -> None:
        """Let the thread end once the calls already queued have run."""
        self._calls.put(self._STOP)

    def _run(self) -> None:
        while (item := self._calls.get()) is not self._STOP:
            future, fn, args = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - handed to whoever awaits the future
                future.set_exception(e)


def start_daemon(name: str, fn: Callable[..., Any], *args: Any) -> None:
    """Fire-and-forget a blocking SDK call (cancelling a task) so barge-in never waits on it."""
    threading.Thread(target=fn, args=args, name=name, daemon=True).start()
