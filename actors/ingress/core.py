"""What every process that takes callers in shares: who is calling
(auth, rate and failure limits, device admission), opening a session the
caller may have (ownership and caps), and the voice sockets.

Two kinds of process use it: Serve's `VoiceIngress` (serve_app.py), which
adds the HTTP routes, and the per-node `DeviceGateway`
(actors/ingress/gateway.py), which serves only the sockets, on its own port,
so a device's frames skip the Serve proxy's hop. One copy of the socket path
keeps the two from drifting apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from typing import Any

from starlette.requests import Request
from starlette.websockets import WebSocket

from actors.config import AppConfig
from actors.ingress.auth import Authenticator, AuthError, Principal
from actors.ingress.limits import FailureLimiter, LimitError, RateLimiter, SessionSlots
from actors.session_ref import StartingSession

METRICS_PUSH_S = 5.0
HEAP_TRIM_S = 60.0
"""How often an ingress process gives its C heap's free pages back
(`_report_metrics`): glibc keeps what closed connections freed. In a busy
gateway a trim gave 10-12 MB back each minute; in the 16-device soak the
trim alone left it at 146 MB after 12 minutes against 162 MB without (the
rest was permessage-deflate's zlib state, now declined; docs/reliability.md).
A trim took ~20 ms on a 400 MB heap here, on this thread, not the loop's."""


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.ws_close_code = 4000 + status if 400 <= status < 500 else 1011


class SessionNotFound(ApiError):
    """Unknown and someone else's session ids get this same answer, so ids
    cannot be probed for existence."""

    def __init__(self, session_id: str) -> None:
        super().__init__(404, "session.not_found", "no session with this id belongs to you")


class IngressCore:
    """Callers, sessions and voice sockets, without a route table (above)."""

    def __init__(self, config: AppConfig, warm: int | None = None) -> None:
        from actors.history_store import HistoryStore
        from actors.ingress.admission import DeviceAdmission
        from actors.ingress.devices import DeviceRegistry
        from actors.ingress.drain import Drain
        from actors.ingress.metrics import HUB_NAME, IngressMetrics, MetricsHub
        from actors.session_manager import SessionManager

        self.config = config
        self.sessions = SessionManager(config, warm)
        self.auth = Authenticator(config.auth)
        self.rate = RateLimiter(config.limits.requests_per_minute, config.limits.burst)
        a = config.auth
        self.ip_failures = FailureLimiter(a.ip_max_failures, a.failure_window_s, a.failure_lock_s,
                                          a.failure_max_lock_s)
        self.slots = SessionSlots(config.limits.max_sessions, config.limits.max_sessions_per_client)
        self.store = HistoryStore.from_config(config)
        # the device registry shares the store's file when the store is SQLite
        db = config.session.store_file() or config.resolve_path("data/history.sqlite3")
        self.admission = DeviceAdmission(config.auth, DeviceRegistry(db))
        self.metrics = IngressMetrics()
        self._replica_id = uuid.uuid4().hex[:12]
        self._metrics_hub = MetricsHub.options(name=HUB_NAME, namespace=config.server.namespace, lifetime="detached",
                                               get_if_exists=True).remote()
        threading.Thread(target=self._report_metrics, name="metrics-push", daemon=True).start()
        self.drain = Drain(config.server.drain_grace_s)  # a shutdown says goodbye on every socket (drain.py)

    def _on_socket_accepted(self) -> None:
        """A hook for the process kind: Serve's replica starts its drain watch here."""

    # ------------------------------------------------------------ helpers
    COUNTED_FAILURES = ("auth.bad_token", "auth.bad_device_token", "auth.bad_credentials")
    """Refusals that cost the caller's address a failure: guesses, not a stale token."""

    def _principal(self, request: Request | WebSocket, client_id: str | None = None,
                   device_id: str | None = None) -> Principal:
        ip_key = "ip:" + self._client_ip(request)
        self.ip_failures.check(ip_key)
        token = Authenticator.token_from(request.headers, request.query_params)
        try:
            principal = self.auth.authenticate(token, client_id, device_id)
        except AuthError as e:
            if e.code in self.COUNTED_FAILURES:
                self.ip_failures.failed(ip_key)
            raise
        self.rate.check(principal.key if principal.kind != "anonymous" else ip_key)
        return principal

    @staticmethod
    def _client_ip(request: Request | WebSocket) -> str:
        return request.client.host if request.client else "unknown"

    def _public_host(self, request: Request) -> str:
        """Where people reach the HTTP API and pages (an activation code names it)."""
        return self.config.ingress.public_url or f"{request.url.scheme}://{request.url.netloc}"

    def _ws_url(self, request: Request, path: str) -> str:
        """The socket URL to hand a caller that reached this process as `request`."""
        raise NotImplementedError

    @staticmethod
    def _ws_url_from(base: str | None, request: Request, path: str) -> str:
        """`path` under a configured public `base`, else on the host and port the caller used."""
        if base:
            return base.rstrip("/") + path
        scheme = "wss" if request.url.scheme == "https" else "ws"
        return f"{scheme}://{request.url.netloc}{path}"

    async def _owned(self, session_id: str, principal: Principal) -> bool:
        """Does `principal` own this session? Asked of the store, which keeps
        the owner as long as the conversation; a session someone else owns and
        one that never existed look the same to the caller. A session this
        ingress is starting for a socket (its client has the id from the
        hello) is claimed, its owner stored, once it is up: that is waited for."""
        await self.sessions.started(session_id)
        if self.store is not None:
            return await self.store.owner_of(session_id) == principal.key
        from actors.sessions import find_session

        actor = await find_session(self.config, session_id, self.sessions.directory)
        return actor is not None and await actor.claim.remote(principal.key)

    async def _open(self, session_id: str | None, principal: Principal, alias: str | None = None,
                    persona: str | None = None, soon: bool = False) -> tuple[str, Any, bool]:
        """Open or resume a session (by id, or by a stable alias such as a
        device id) as `persona` when given. Resuming needs the id to be the
        caller's; a new session needs a place under the caller's and the
        cluster's session caps. `soon` (a socket): a session that needs a new
        actor comes back as a `StartingSession`, claimed once it is up."""
        sid, actor, resumed = await self._open_owned(session_id, principal, alias, soon)
        if persona is not None:
            if isinstance(actor, StartingSession):
                actor = actor.then(lambda ref: ref.set_persona.remote(persona))
            else:
                await actor.set_persona.remote(persona)
        return sid, actor, resumed

    def _check_persona(self, persona: str | None) -> str | None:
        if persona is not None and not self.config.has_persona(persona):
            raise ApiError(404, "persona.not_found", f"no persona {persona!r}; GET /api/roles lists them")
        return persona

    async def _open_owned(self, session_id: str | None, principal: Principal,
                          alias: str | None = None, soon: bool = False) -> tuple[str, Any, bool]:
        owner = principal.key
        open_ = self.sessions.open_soon if soon else self.sessions.open
        limits = self.config.limits
        caps = (limits.max_live_sessions_per_principal, limits.max_live_sessions_per_node)
        if alias is not None:  # only sockets name an alias
            actor, resumed = await self.sessions.open_alias(alias, owner, *caps)  # raises when refused
            refused = None
        elif session_id:
            if not await self._owned(session_id, principal):
                raise SessionNotFound(session_id)
            actor, refused = await self.sessions.resume_admitted(session_id, owner, *caps)
            if not soon and isinstance(actor, StartingSession):
                actor = await actor
            resumed = True
        else:
            actor, resumed = await open_(None), False
            refused = await self.sessions.directory.admit.remote(actor.session_id, owner, *caps)
        sid = actor.session_id
        if refused is not None:
            if not resumed and alias is None:  # a fresh session nobody may have: its actor goes back to the spares
                if isinstance(actor, StartingSession):
                    actor.then(lambda ref: ref.close.remote())
                else:
                    actor.close.remote()
            raise LimitError(refused)
        if isinstance(actor, StartingSession):  # a session on a new actor: claimed once it is up
            return sid, actor.then(lambda ref: self._claim_started(ref, owner)), resumed
        if soon and not resumed:
            # a warm session handed to this socket just now: nobody else has its id, so its claim
            # (a store write) may follow the hello; the socket reads nothing from its client until
            # the claim and its subscription are done
            return sid, self.sessions.after_hello(sid, self._claimed(actor, sid, owner)), resumed
        return sid, await self._claimed(actor, sid, owner, soon), resumed

    async def _claimed(self, actor: Any, sid: str, owner: str, soon: bool = False) -> Any:
        """`actor` once claimed for `owner`; one that died or ended since it
        was handed out (the directory's host is last known, unchecked) is
        opened once more under the same id. → the actor; with `soon` (a
        socket), a `StartingSession` claimed once up if it needs a new actor,
        so the hello of a device whose session's actor died waits for no
        start (it waited for the whole start before its hello, uncounted in
        `voice_hello_before_session`)."""
        import ray

        try:
            claimed = await actor.claim.remote(owner)
        except ray.exceptions.RayActorError:  # its place stays counted: the same session, reopened
            actor = await (self.sessions.open_soon if soon else self.sessions.open)(sid)
            if isinstance(actor, StartingSession):
                return actor.then(lambda ref: self._claim_started(ref, owner))
            claimed = await actor.claim.remote(owner)
        if not claimed:
            raise SessionNotFound(sid)
        return actor

    @staticmethod
    async def _claim_started(actor: Any, owner: str) -> None:
        if not await actor.claim.remote(owner):
            raise SessionNotFound(actor.session_id)

    async def _live_owned(self, session_id: str, principal: Principal) -> Any:
        """The live actor of a session the caller owns, else session.not_found."""
        from actors.sessions import find_session

        owned = await self._owned(session_id, principal)
        actor = await find_session(self.config, session_id, self.sessions.directory) if owned else None
        if actor is None:
            raise SessionNotFound(session_id)
        return actor

    def _report_metrics(self) -> None:
        """Every few seconds, this process's snapshot to the hub (a thread:
        the replica's own loop does not exist yet in __init__); every
        `HEAP_TRIM_S`, the heap's free pages back to the OS."""
        from actors.heap import trim_heap

        trimmed = time.monotonic()
        while True:
            time.sleep(METRICS_PUSH_S)
            try:
                self._metrics_hub.put.remote(self._replica_id, self.metrics.snapshot())
            except Exception:  # Ray shutting down: the thread ends with the process
                return
            if time.monotonic() - trimmed >= HEAP_TRIM_S:
                trimmed = time.monotonic()
                trim_heap()

    # ------------------------------------------------------------ voice sockets
    async def serve_native_socket(self, ws: WebSocket) -> None:
        from actors.protocols.native import NativeProtocol

        await self._socket(ws, NativeProtocol(self.config.session.max_frame_bytes), owner_from=None)

    async def serve_xiaozhi_socket(self, ws: WebSocket) -> None:
        from actors.protocols.base import ProtocolError
        from actors.protocols.xiaozhi import XiaozhiProtocol

        version = self._header_or_query(ws, "protocol-version") or "1"
        try:
            adapter = XiaozhiProtocol(int(version) if version in ("1", "2", "3") else -1,
                                      self.config.ingress.xiaozhi_output_sample_rate,
                                      self.config.session.max_frame_bytes, tuple(self.config.session.wake_words))
        except ProtocolError as e:
            await ws.accept()
            await ws.close(e.close_code, e.code)
            return
        device_id = self._header_or_query(ws, "device-id", "device_id")
        client_id = self._header_or_query(ws, "client-id", "client_id")
        if not device_id:
            await ws.accept()
            await ws.close(4400, "xiaozhi.missing_device_id")
            return
        await self._socket(ws, adapter, owner_from=(client_id, device_id))

    async def _socket(self, ws: WebSocket, adapter: Any, owner_from: tuple[str | None, str] | None) -> None:
        from actors.ingress.connection import VoiceConnection
        from actors.ingress.drain import CLOSE_CODE, REASON, retry_after_ms

        await ws.accept()
        self._on_socket_accepted()
        if self.drain.draining:  # this process is going away: come back to the next one
            with contextlib.suppress(Exception):
                for frame in adapter.goodbye(None, REASON, retry_after_ms()):
                    await ws.send_text(frame) if isinstance(frame, str) else await ws.send_bytes(frame)
                await ws.close(CLOSE_CODE, REASON)
            return
        client_id, device_id = owner_from if owner_from else (None, None)
        try:
            principal = self._principal(ws, client_id, device_id)
            device_persona: list[str | None] = []  # its owner's choice, read with its admission: for the first open
            if principal.device_id is not None and principal.kind == "device":
                device_persona.append(await asyncio.to_thread(self.admission.check_socket, principal.device_id))
            slot = self.slots.acquire(principal.key)
        except (AuthError, LimitError) as e:
            self.metrics.refused(e.code)
            await ws.close(e.ws_close_code, e.code)
            return
        # a device keeps one session across reconnects, and one socket on it;
        # others resume by id in hello
        alias = principal.key if principal.device_id else None

        async def open_session(session_id: str | None, persona: str | None = None) -> tuple[str, Any, bool]:
            if persona is None and principal.kind == "device" and principal.device_id is not None:
                persona = device_persona.pop() if device_persona else \
                    await asyncio.to_thread(self.admission.registry.persona_of, principal.device_id)
                if persona is not None and not self.config.has_persona(persona):
                    persona = None  # removed from the config since: the default
            opened = await self._open(session_id, principal, alias, self._check_persona(persona), soon=True)
            if isinstance(opened[1], StartingSession) and opened[1].starts_actor:
                self.metrics.hello_before_session(adapter.name)
            return opened

        self.metrics.connected(adapter.name)
        connection = VoiceConnection(ws, adapter, open_session, self.config, self.metrics.observe,
                                     exclusive=alias is not None, hello_in_flight=self.sessions.hello_in_flight)
        self.drain.add(connection)  # a shutdown of this process says goodbye on it (drain.py)
        try:
            await connection.serve()
        except (AuthError, LimitError, ApiError) as e:
            self.metrics.refused(e.code)
            error = {"type": "error", "code": e.code, "message": e.message}
            if getattr(e, "retry_after_s", None):
                error["retry_after_ms"] = round(e.retry_after_s * 1000)
            with contextlib.suppress(Exception):  # the client may already be gone
                await ws.send_text(json.dumps(error))
                await ws.close(e.ws_close_code, e.code)
        finally:
            self.drain.discard(connection)
            slot.release()
            self.metrics.disconnected(adapter.name)

    @staticmethod
    def _header_or_query(ws: WebSocket, *names: str) -> str | None:
        """Firmware that cannot set headers sends them in the query string."""
        for n in names:
            value = ws.headers.get(n) or ws.query_params.get(n)
            if value:
                return value
        return None
