"""One Ray instance for the whole test session (DESIGN §7: ~4-6 s each),
plus speech fixtures made with the embedded TTS at test time."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.pg import pg_server  # noqa: F401  (a fixture: one PostgreSQL server per test session)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
os.environ.setdefault("no_proxy", "127.0.0.1,localhost")

TEST_NAMESPACE = "voice-actors-test"
INGRESS_PORT = int(os.environ.get("VA_TEST_INGRESS_PORT", "18765"))
"""One Serve proxy for the session; each ingress test module runs its own app on it.
Two test runs on one machine need two ports (VA_TEST_INGRESS_PORT)."""


@pytest.fixture(scope="session")
def config() -> Any:
    import tempfile

    from actors.config import load_config

    history_db = Path(tempfile.mkdtemp(prefix="va-test-")) / "history.sqlite3"
    return load_config(env={
        "VOICE_ACTORS__SESSION__HISTORY_DB": str(history_db),
        "VOICE_ACTORS__MEMORY__URL": f"sqlite:///{history_db.parent / 'memory.sqlite3'}",
        "VOICE_ACTORS__QUICK_REPLIES__CACHE_DIR": str(history_db.parent / "tts-cache"),
        "VOICE_ACTORS__KNOWLEDGE__STORE_DIR": str(history_db.parent / "knowledge"),
        "VOICE_ACTORS__SERVER__NAMESPACE": TEST_NAMESPACE,
        "VOICE_ACTORS__SERVER__WARM_SESSIONS": "1",
        # the warm pool refills whatever the node's load: tests share two cores with their own
        # node's boots and model loads, and wait for warm actors; the wait for an idle core has
        # its own test (test_session_actor, test_node_cpu)
        "VOICE_ACTORS__SERVER__REFILL_IDLE_CPUS": "0",
        "VOICE_ACTORS__SESSION__IDLE_TIMEOUT_S": "600",
    })


@pytest.fixture(scope="session")
def ray_cluster(config: Any) -> Iterator[Any]:
    import ray

    from actors.worker_env import prepare_this_node

    prepare_this_node()  # its workers run as those of a node the server starts
    # "local": always a Ray of its own; with no address, ray.init joins the
    # last cluster `ray start` (or another test run's Cluster) left on the machine
    ray.init(address="local", num_cpus=2, include_dashboard=False, namespace=TEST_NAMESPACE,
             log_to_driver=False, configure_logging=False)
    from actors.pools import ensure_pools

    ensure_pools(config)
    yield ray
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["namespace"] == TEST_NAMESPACE:
            try:
                ray.kill(ray.get_actor(actor["name"], namespace=TEST_NAMESPACE))
            except ValueError:
                pass
    ray.shutdown()


@pytest.fixture(scope="session")
def cluster_address(ray_cluster: Any) -> str:
    """This test session's Ray (GCS) address, for subprocesses that join it:
    `address="auto"` joins whichever cluster started last on the machine."""
    return ray_cluster.get_runtime_context().gcs_address


@pytest.fixture(scope="session")
def speech(ray_cluster: Any, config: Any) -> Callable[[str], bytes]:
    """Text → PCM16 16 kHz speech, synthesised by the embedded piper voice."""
    from actors.audio import resample_pcm16
    from actors.pools import get_pool

    pool = get_pool("tts", "local-piper", config)
    cache: dict[str, bytes] = {}

    def make(text: str) -> bytes:
        if text not in cache:
            seg = ray_cluster.get(pool.synthesize.remote(text))
            cache[text] = resample_pcm16(seg.pcm16, seg.sample_rate, 16000)
        return cache[text]

    return make


class EventTap:
    """Collects a session actor's events in the background for assertions."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor
        self.events: list[Any] = []
        from actors.session import EventStream

        self._stream = EventStream(actor)
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    async def __aenter__(self) -> EventTap:
        first = await asyncio.wait_for(self._stream.__anext__(), 30)
        self.events.append(first)
        self._task = asyncio.get_running_loop().create_task(self._pump())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task:
            self._task.cancel()
        self._stream.close()

    async def _pump(self) -> None:
        async for event in self._stream:
            self.events.append(event)
            self._changed.set()

    async def wait_for(self, pred: Callable[[Any], bool], timeout: float = 60.0) -> Any:
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for ev in self.events[seen:]:
                if pred(ev):
                    return ev
            seen = len(self.events)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                kinds = [e.type for e in self.events[-30:]]
                raise AssertionError(f"event not seen within {timeout} s; last events: {kinds}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except asyncio.TimeoutError:
                pass

    def of(self, type_: str, turn: int | None = None) -> list[Any]:
        return [e for e in self.events if e.type == type_ and (turn is None or e.turn_id == turn)]


@pytest.fixture
def tap() -> type[EventTap]:
    return EventTap


def hosted_session(session_id: str, namespace: str = TEST_NAMESPACE) -> Any:
    """The live session `session_id` on its actor (a `SessionRef`), or None:
    blocking, for test helpers (the product's `find_session` is async)."""
    import ray

    from actors.session_directory import directory_name
    from actors.session_ref import SessionRef

    actor = ray.get(ray.get_actor(directory_name(), namespace=namespace).locate.remote(session_id))
    return None if actor is None else SessionRef(actor, session_id)


def frames_of(pcm16: bytes, start_seq: int = 0, frame_ms: int = 60) -> list[tuple[int, bytes]]:
    from actors.audio import split_frames

    return [(start_seq + i, f) for i, f in enumerate(split_frames(pcm16, frame_ms))]


async def send_frames(actor: Any, frames: list[tuple[int, bytes]], stream: str = "test",
                      batch: int = 5, realtime: bool = False, frame_ms: int = 60) -> int:
    accepted = 0
    for i in range(0, len(frames), batch):
        accepted += await actor.send_audio.remote(frames[i:i + batch], 16000, stream)
        if realtime:
            await asyncio.sleep(batch * frame_ms / 1000)
    return accepted


def served_config(config: Any, devices: list[str], admission: str = "allowlist", **auth: Any) -> Any:
    """The config a module serving the ingress uses: real secrets, `devices`
    admitted by `admission`, limits loose enough for a module's many sockets
    (one principal opens dozens). `auth` adds auth fields (users)."""
    from pydantic import SecretStr

    auth_cfg = config.auth.model_copy(update={
        "jwt_secret": SecretStr("test-jwt-secret-0123456789abcdef0123"),
        "device_secret": SecretStr("test-device-secret-0123456789abcdef"),
        "device_allowlist": list(devices), "device_admission": admission, **auth,
    })
    limits = config.limits.model_copy(update={"requests_per_minute": 600, "burst": 40,
                                              "max_live_sessions_per_principal": 64})
    return config.model_copy(update={"auth": auth_cfg, "limits": limits})


def _empty_metrics_hub(namespace: str) -> None:
    """Each module's server starts with an empty metrics hub (restarted: the
    named actor stays, its snapshots go). The hub keeps every ingress
    process's counts, gone ones' too (`SnapshotSum`), so without this an
    earlier module's replicas and gateways would be in a module's sums (and
    before gone processes' counts were kept, they aged out of the sums in the
    middle of a test that read a counter before and after a connect: 6, then
    4)."""
    import ray

    from actors.ingress.metrics import HUB_NAME

    try:
        hub = ray.get_actor(HUB_NAME, namespace=namespace)
    except ValueError:  # none yet
        return
    ray.kill(hub, no_restart=False)


def run_ingress(config: Any, name: str) -> Iterator[str]:
    """Serve the ingress built from `config` at / on INGRESS_PORT for one
    module (use with `yield from` in a module fixture); → its base URL."""
    from ray import serve

    from serve_app import build_app

    _empty_metrics_hub(config.server.namespace)
    serve.start(http_options={"host": "127.0.0.1", "port": INGRESS_PORT})
    serve.run(build_app(config), name=name, route_prefix="/")
    yield f"http://127.0.0.1:{INGRESS_PORT}"
    serve.delete(name)


# ------------------------------------------------------------------ browser pages (tests/browser.py)
@pytest.fixture(scope="module")
def chromium_path() -> str:
    from tests.browser import find_chromium

    return find_chromium()


@pytest.fixture
async def page(browser):
    """A fresh context and page on the module's own `browser` fixture; the
    test fails if the page threw."""
    context = await browser.new_context(viewport={"width": 900, "height": 860})
    pg = await context.new_page()
    pg.set_default_timeout(30_000)
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    await context.close()
    assert not errors, f"page errors: {errors}"
