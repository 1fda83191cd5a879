"""Ray Serve ingress: `serve run serve_app:app` (or `serve deploy config/serve.yaml`).

Thin on purpose: routes, auth, limits and hand-off to protocol adapters
(actors/protocols) and session actors (actors/sessions). No wire format,
dialogue or vendor API lives here.
"""

import asyncio
import base64
import logging
import secrets
import time
from typing import Any

import ray
from fastapi import Body, FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from ray import serve

from actors.config import AppConfig, load_config
from actors.ingress.auth import Authenticator, AuthError, Principal, check_device_ids
from actors.ingress.core import ApiError, IngressCore, SessionNotFound
from actors.ingress.http_errors import ERROR_HANDLERS, error_response
from actors.ingress.http_guard import BodyGuard, Cors, json_body
from actors.ingress.limits import FailureLimiter
from actors.ingress.ota import ACTIVATE_PATH, OTA_PATH, activation_status, answer_ota, ota_info
from actors.protocols.base import SESSION_ID_PATTERN
from actors.protocols.base import valid_session_id as _valid_session_id

log = logging.getLogger("voice_actors.ingress")

api = FastAPI(
    title="voice-actors",
    version="0.1.0",
    description="Real-time voice sessions as Ray actors. WebSocket protocols: `/ws/voice` (native, "
                "docs/protocol.md), `/xiaozhi/v1/` (xiaozhi-esp32), `/ws/text/stream` (text only).",
)



for _exception, _handler in ERROR_HANDLERS.items():  # the one envelope (actors/ingress/http_errors.py)
    api.add_exception_handler(_exception, _handler)


@api.exception_handler(RequestValidationError)
async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
    first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
    where = ".".join(str(p) for p in first["loc"])
    return error_response(422, "request.invalid", f"{where}: {first['msg']}")


WARM_BESIDE_GATEWAY = 2
"""Warm sessions a replica keeps when the device gateway holds the node's pool."""
UPLOAD_ROUTES = ("/api/audio/stt", "/api/audio/process", "/api/knowledge/documents")
api.add_middleware(BodyGuard)
api.add_middleware(Cors)  # outermost: refusals from BodyGuard carry CORS headers too


# ------------------------------------------------------------------ bodies
class LoginBody(BaseModel):
    username: str = Field(min_length=1, max_length=128)
    password: str = Field(min_length=1, max_length=1024)


PERSONA_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,47}$"


class TextBody(BaseModel):
    text: str = Field(min_length=1, max_length=4000)
    session_id: str | None = Field(None, max_length=64, pattern=SESSION_ID_PATTERN)
    persona: str | None = Field(None, max_length=48, pattern=PERSONA_PATTERN)
    """A persona id (GET /api/roles); None keeps the session's."""


class BatchBody(BaseModel):
    texts: list[str] = Field(min_length=1, max_length=32)
    session_id: str | None = Field(None, max_length=64, pattern=SESSION_ID_PATTERN)


class TTSBody(BaseModel):
    text: str = Field(min_length=1, max_length=4000)
    sample_rate: int = Field(16000, ge=8000, le=48000)


class VoiceStartBody(BaseModel):
    session_id: str | None = Field(None, max_length=64, pattern=SESSION_ID_PATTERN)
    persona: str | None = Field(None, max_length=48, pattern=PERSONA_PATTERN)
    """A persona id (GET /api/roles); None keeps the session's."""


class DevicePatchBody(BaseModel):
    persona: str | None = Field(max_length=48, pattern=PERSONA_PATTERN)
    """The persona the device speaks as; null = the server's default."""


class VoiceEndBody(BaseModel):
    session_id: str = Field(max_length=64, pattern=SESSION_ID_PATTERN)


class ActivateBody(BaseModel):
    code: str = Field(pattern=r"^[0-9]{6}$")


@serve.deployment(max_ongoing_requests=1000, graceful_shutdown_timeout_s=120)
@serve.ingress(api)
class VoiceIngress(IngressCore):
    def __init__(self, config: AppConfig) -> None:
        from actors.agent.memory import MemoryStore
        from actors.ingress import http_guard  # imported here: a module global would be a pickled copy
        from actors.ingress.drain import ReplicaDrainWatch
        from actors.pools import ensure_pools
        from actors.providers.stages import chained_stt, chained_tts

        http_guard.configure(config.limits.max_json_bytes, config.limits.max_request_bytes, UPLOAD_ROUTES,
                             config.ingress.cors_allowed_origins)
        ensure_pools(config)
        # devices take their sessions from the gateway's warm pool when it is on; this replica keeps a
        # few for the HTTP API and the web page (each spare: ~58 MB and ~0.9 % of a core, DESIGN §5)
        warm = min(WARM_BESIDE_GATEWAY, config.server.warm_sessions) if config.ingress.gateway_port else None
        super().__init__(config, warm)  # auth, limits, admission, sessions, metrics, drain: actors/ingress/core.py
        a = config.auth
        self.login_failures = FailureLimiter(a.login_max_failures, a.failure_window_s, a.failure_lock_s,
                                             a.failure_max_lock_s)
        self._memory_store = MemoryStore(config.memory) if config.memory.enabled else None
        self._stt = chained_stt(config)  # for the HTTP audio routes, with the sessions' failover
        self._tts = chained_tts(config)
        self._init_control_panel()  # section "control panel" below
        self._drain_watch = ReplicaDrainWatch(self.drain)
        self._gateway = None
        if config.ingress.gateway_port:  # device sockets without the proxy's hop: actors/ingress/gateway.py
            from actors.ingress.gateway import GatewayLease

            self._gateway = GatewayLease(config)

    def __del__(self) -> None:
        """Serve's graceful shutdown calls this only once no request is left
        (so never while a socket is open: actors/ingress/drain.py); draining
        here as well covers a replica whose watch never started."""
        drain = getattr(self, "drain", None)
        if drain is not None:
            drain.start()
            self._drain_watch.stop()

    async def _turn(self, actor: Any, send: Any) -> Any:
        from actors.sessions import collect_turn

        result = await collect_turn(actor, send, timeout_s=120)
        for ev in result.events:
            self.metrics.observe(ev)
        return result

    @staticmethod
    def _turn_json(sid: str, result: Any) -> dict[str, Any]:
        return {"session_id": sid, "turn_id": result.turn_id, "transcript": result.transcript,
                "reply": result.reply, "metrics": result.metrics,
                "errors": [{"code": str(e.code), "message": e.message} for e in result.errors]}

    # ------------------------------------------------------------ operations
    @api.get("/health")
    async def health(self) -> JSONResponse:
        """Real state, for load balancers and operators: each node's provider
        pool answers and has its model loaded, the store takes writes, the
        warm pool. 503 with the failing checks when degraded."""
        from actors.pools import get_pool, pool_handles, pooled_providers

        async def pool_check(node_id: str, handle: Any) -> dict[str, Any]:
            try:
                stats = await asyncio.wait_for(handle.stats.remote(), 5.0)
                return {"ok": True, "node": node_id[:8], "runs_on": stats["node_id"][:8], "calls": stats["calls"],
                        "failures": stats["failures"], "in_flight": stats["in_flight"]}
            except Exception as e:  # unreachable, still loading, or its model failed to load
                return {"ok": False, "node": node_id[:8], "error": type(e).__name__}

        checks: dict[str, Any] = {}
        for kind, provider in pooled_providers(self.config):
            # One pool per node (DESIGN §3): all of them, summed, with each node's own line;
            # none at all (never made, or all gone) → this replica's node's, made now as before.
            try:
                pools = await asyncio.wait_for(asyncio.to_thread(pool_handles, kind, provider, self.config), 5.0)
            except Exception:
                pools = {}
            if not pools:
                here = ray.get_runtime_context().get_node_id()
                pools = {here: get_pool(kind, provider, self.config, here)}
            nodes = list(await asyncio.gather(*(pool_check(n, h) for n, h in pools.items())))
            checks[f"pool:{kind}"] = {"ok": all(n["ok"] for n in nodes), "provider": provider,
                                      **{k: sum(n.get(k, 0) for n in nodes) for k in ("calls", "failures", "in_flight")},
                                      "nodes": nodes}
        try:
            await asyncio.wait_for(asyncio.to_thread(self.admission.registry.check_writable), 5.0)
            checks["store"] = {"ok": True}
        except Exception as e:
            checks["store"] = {"ok": False, "error": type(e).__name__}
        try:  # the directory finds every session: without it no session can be opened or resumed
            checks["sessions"] = {"ok": True, **await asyncio.wait_for(self.sessions.directory.describe.remote(), 5.0)}
        except Exception as e:
            checks["sessions"] = {"ok": False, "error": type(e).__name__}
        if self._gateway is not None:  # this node's device sockets: without it no device connects here
            try:
                gateway = await asyncio.wait_for(self._gateway.handle.stats.remote(), 5.0)
                checks["device_gateway"] = {"ok": gateway["listening"], **gateway}
            except Exception as e:
                checks["device_gateway"] = {"ok": False, "error": type(e).__name__}
        ok = all(c["ok"] for c in checks.values())
        from actors.providers.adapters.breaker import breaker_states

        body = {"status": "ok" if ok else "degraded", "checks": checks, "sockets": self.slots.in_use,
                "breakers": breaker_states(),  # this replica's (HTTP audio routes); sessions' are per session
                "warm_sessions_ready": self.sessions.warm_ready(), "warm_sessions_target": self.sessions.warm_target}
        return JSONResponse(body, status_code=200 if ok else 503)

    @api.get("/metrics")
    async def prometheus(self) -> Response:
        """The whole deployment's metrics (every replica's, summed by the hub)."""
        from prometheus_client import CONTENT_TYPE_LATEST

        await self._metrics_hub.put.remote(self._replica_id, self.metrics.snapshot())
        return Response(await self._metrics_hub.render.remote(), media_type=CONTENT_TYPE_LATEST)

    # ------------------------------------------------------------ auth
    @api.post("/api/auth/login")
    async def login(self, body: LoginBody, request: Request) -> dict[str, Any]:
        """Failed attempts lock the user name and the address with growing
        back-off, checked before any hashing, so guessing costs the guesser
        time and the server nothing."""
        ip_key, user_key = "ip:" + self._client_ip(request), "login:" + body.username
        self.rate.check("login:" + ip_key)
        self.ip_failures.check(ip_key)
        self.login_failures.check(user_key)
        try:
            token = await asyncio.to_thread(self.auth.login, body.username, body.password)
        except AuthError:
            self.ip_failures.failed(ip_key)
            self.login_failures.failed(user_key)
            raise
        self.login_failures.succeeded(user_key)
        return {"access_token": token, "token_type": "bearer", "expires_in": self.config.auth.token_ttl_s}

    @api.get("/api/auth/me")
    async def me(self, request: Request) -> dict[str, Any]:
        p = self._principal(request)
        return {"subject": p.subject, "kind": p.kind, "roles": list(p.roles), "expires_at": p.expires_at}

    # ------------------------------------------------------------ web pages (issue 11: the voice page)
    # GET / serves web/index.html; GET /web/<name> serves a flat file of web/ (no sub-folders, no
    # traversal, known types only). GET /api/auth/dev-token hands the page a token only on the
    # development machine itself (see _dev_token_refusal). The page's logic: web/voice.js.
    WEB_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png",
                 ".ico": "image/x-icon", ".woff2": "font/woff2"}
    WEB_NAME = r"^[A-Za-z0-9][A-Za-z0-9_-]*(\.[A-Za-z0-9]+)+$"
    DEV_SUBJECT = "local-dev"
    """The subject `voice-actors serve` gives its development token (actors/cli.py)."""
    PROXY_HEADERS = ("forwarded", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "x-real-ip",
                     "x-client-ip", "true-client-ip", "cf-connecting-ip", "x-cluster-client-ip", "via")

    @api.get("/", include_in_schema=False)
    async def web_index(self, request: Request) -> Response:
        return self._web_file("index.html", request)

    @api.get("/web/{name}", include_in_schema=False)
    async def web_asset(self, name: str, request: Request) -> Response:
        return self._web_file(name, request)

    def _web_file(self, name: str, request: Request) -> Response:
        import re
        from pathlib import PurePosixPath

        suffix = PurePosixPath(name).suffix.lower()
        if not re.fullmatch(self.WEB_NAME, name) or suffix not in self.WEB_TYPES:
            raise ApiError(404, "http.404", "Not Found")
        root = self.config.resolve_path("web").resolve()
        path = (root / name).resolve()
        if path.parent != root or not path.is_file():
            raise ApiError(404, "http.404", "Not Found")
        host = request.headers.get("host", "")
        plain_host = re.fullmatch(r"[A-Za-z0-9.-]+(:\d{1,5})?|\[[0-9A-Fa-f:.]+\](:\d{1,5})?", host)
        ws_sources = f" ws://{host} wss://{host}" if plain_host else ""  # never an odd Host into the header
        csp = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; font-src 'self'; "
               f"connect-src 'self'{ws_sources}; media-src 'self' blob:; worker-src 'self'; "
               "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
        return Response(path.read_bytes(), media_type=self.WEB_TYPES[suffix],
                        headers={"Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff",
                                 "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY",
                                 "Cache-Control": "no-cache"})

    @api.get("/api/auth/dev-token", include_in_schema=False)
    async def dev_token(self, request: Request) -> JSONResponse:
        """The voice page's "use development token": answers only a request made on this machine to
        this server directly (loopback peer, loopback Host, no proxy header, same-origin or no
        Origin), and only when the server was started by `voice-actors serve`, i.e. a development
        token that verifies with this server's secret is in ~/.voice-actors-token. The page gets a
        fresh token for the same subject with the plain `user` role, never the file's admin one."""
        from actors.cli import DEV_TOKEN_FILE

        ip = self._client_ip(request)
        self.rate.check("dev-token:ip:" + ip)
        refusal = self._dev_token_refusal(ip, request.headers, request.url.scheme)
        if refusal is not None:
            raise ApiError(403, "auth.dev_token_forbidden", refusal)
        token = await asyncio.to_thread(self._dev_token_from, self.auth, DEV_TOKEN_FILE, self.DEV_SUBJECT)
        if token is None:
            raise ApiError(404, "auth.no_dev_token", "this server was not started with a development token "
                                                     "(`voice-actors serve` makes one); sign in instead")
        return JSONResponse({"access_token": token, "token_type": "bearer",
                             "expires_in": self.config.auth.token_ttl_s}, headers={"Cache-Control": "no-store"})

    @classmethod
    def _dev_token_refusal(cls, peer: str | None, headers: Any, scheme: str = "http") -> str | None:
        """Why a dev-token request is refused, or None. A proxy on this machine makes every remote
        caller look like loopback, so any forwarding header refuses; a loopback Host stops DNS
        rebinding; Origin / Sec-Fetch-Site stop another site's page (CORS is open) reading it."""
        import ipaddress

        from actors.ingress.admission import is_loopback

        try:
            addr = ipaddress.ip_address(peer or "")
            mapped = getattr(addr, "ipv4_mapped", None)  # ::ffff:127.0.0.1 on a dual-stack socket
            loopback = addr.is_loopback or bool(mapped and mapped.is_loopback)
        except ValueError:
            loopback = False
        if not loopback:
            return "the development token is only handed out on the server's own machine"
        if any(name.lower() in cls.PROXY_HEADERS or name.lower().startswith("x-forwarded-") for name in headers):
            return "the development token is never handed out through a proxy"
        host = headers.get("host", "")
        hostname = host.rsplit(":", 1)[0] if not host.startswith("[") else host[1:host.find("]")]
        if hostname != "localhost" and not is_loopback(hostname):
            return "the development token needs a localhost address in the URL"
        origin = headers.get("origin")
        if origin is not None and origin != f"{scheme}://{host}":
            return "the development token is only for this server's own page"
        if headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
            return "the development token is only for this server's own page"
        return None

    @staticmethod
    def _dev_token_from(auth: Authenticator, path: Any, subject: str) -> str | None:
        """A fresh `user` token for `subject` when `path` holds a valid development token signed by
        this server (so it was started by `voice-actors serve`), else None."""
        try:
            found = auth.verify_token(path.read_text().strip())
        except (OSError, UnicodeDecodeError, AuthError):
            return None
        if found.subject != subject or found.kind != "user":
            return None
        return auth.issue_token(subject, roles=("user",))

    # ------------------------------------------------------------ text
    @api.post("/api/text/process")
    async def text_process(self, body: TextBody, request: Request) -> dict[str, Any]:
        from actors.session import subscribing_as

        p = self._principal(request)
        sid, actor, _ = await self._open(body.session_id, p, persona=self._check_persona(body.persona))

        async def send() -> bool:
            return await actor.send_text.remote(body.text) is not None

        with subscribing_as(speak=False):  # this request wants text; a device on the session still hears the reply
            return self._turn_json(sid, await self._turn(actor, send))

    @api.post("/api/text/batch")
    async def text_batch(self, body: BatchBody, request: Request) -> dict[str, Any]:
        """Texts answered in order in one session, so later ones see earlier ones."""
        from actors.session import subscribing_as

        p = self._principal(request)
        sid, actor, _ = await self._open(body.session_id, p)
        results = []
        for text in body.texts:
            async def send(text: str = text) -> bool:
                return await actor.send_text.remote(text) is not None

            with subscribing_as(speak=False):
                results.append(self._turn_json(sid, await self._turn(actor, send)))
        return {"session_id": sid, "results": results}

    @api.websocket("/ws/text/stream")
    async def text_stream(self, ws: WebSocket) -> None:
        from actors.protocols.text_stream import TextStreamProtocol

        await self._socket(ws, TextStreamProtocol(), owner_from=None)

    # ------------------------------------------------------------ audio
    @api.post("/api/audio/stt")
    async def audio_stt(self, request: Request) -> dict[str, Any]:

        self._principal(request)
        pcm = await self._decode_upload(request)
        started = time.perf_counter()
        text = await self._stt.transcribe(pcm)
        return {"text": text, "duration_s": round(len(pcm) / 32000, 3),
                "latency_ms": round((time.perf_counter() - started) * 1000, 1)}

    @api.post("/api/audio/tts")
    async def audio_tts(self, body: TTSBody, request: Request) -> Response:
        from actors.audio import resample_pcm16, wav_bytes

        self._principal(request)
        seg = await self._tts.synthesize(body.text)
        pcm = resample_pcm16(seg.pcm16, seg.sample_rate, body.sample_rate)
        return Response(wav_bytes(pcm, body.sample_rate), media_type="audio/wav")

    @api.post("/api/audio/process")
    async def audio_process(self, request: Request) -> dict[str, Any]:
        """One spoken turn over HTTP: audio file in, transcript + reply + reply WAV (base64) out."""
        from actors.audio import silence, split_frames, wav_bytes
        from actors.session import subscribing_as
        from actors.sessions import send_utterance

        p = self._principal(request)
        pcm = await self._decode_upload(request)
        sid, actor, _ = await self._open(self._query_session_id(request), p)
        frames = split_frames(pcm + silence(1500), 60)
        # the whole reply at once, unless a device on this session listens in real time
        with subscribing_as(speak=True, pace=False):
            result = await self._turn(actor, lambda: send_utterance(actor, frames))
        if result.transcript is None and not result.errors:
            raise ApiError(422, "audio.no_speech", "no speech was found in the audio")
        out = self._turn_json(sid, result)
        out["audio_wav_base64"] = base64.b64encode(wav_bytes(result.audio, result.sample_rate)).decode()
        return out

    async def _decode_upload(self, request: Request) -> bytes:
        from actors.audio import AudioFormatError
        from actors.audio_formats import decode_upload

        data = await self._body_bytes(request)
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            form = await request.form()
            upload = next((v for v in form.values() if hasattr(v, "read")), None)
            if upload is None:
                raise ApiError(400, "request.no_file", "multipart body has no file part")
            data, content_type = await upload.read(), upload.content_type or ""
            filename = upload.filename
        else:
            filename = None
        rate = request.query_params.get("sample_rate")
        if rate is not None and not (rate.isascii() and rate.isdigit() and len(rate) <= 6):
            raise ApiError(422, "request.invalid", "sample_rate must be a whole number of Hz")
        try:
            return await asyncio.to_thread(decode_upload, data, content_type, filename,
                                           int(rate) if rate else None, self.config.limits.max_upload_seconds)
        except AudioFormatError as e:
            raise ApiError(415, "audio.unsupported_format", str(e)) from None

    @staticmethod
    def _query_session_id(request: Request) -> str | None:
        import re

        sid = request.query_params.get("session_id")
        if sid is not None and not re.fullmatch(SESSION_ID_PATTERN, sid):
            raise ApiError(422, "request.invalid", "session_id: not a session id")
        return sid

    # ------------------------------------------------------------ sessions
    @api.post("/api/voice/start")
    async def voice_start(self, request: Request, body: VoiceStartBody = Body(default=VoiceStartBody())) -> dict:
        p = self._principal(request)
        sid, _, resumed = await self._open(body.session_id, p, persona=self._check_persona(body.persona))
        return {"session_id": sid, "resumed": resumed, "websocket": {"url": self._ws_url(request, "/ws/voice"),
                                                                     "protocol": "voice-actors/1"}}

    @api.get("/api/roles")
    async def roles(self, request: Request) -> dict[str, Any]:
        """The personas a session may take (at hello, `persona` in /api/voice/start
        or /api/text/process, or a device's setting)."""
        self._principal(request)
        return {"default": self.config.default_persona,
                "roles": [p.summary() for p in self.config.personas.values()]}

    @api.post("/api/voice/end")
    async def voice_end(self, body: VoiceEndBody, request: Request) -> dict[str, Any]:
        p = self._principal(request)
        await self._end(await self._live_owned(body.session_id, p))
        return {"session_id": body.session_id, "ended": True}

    @api.get("/api/session/validate/{session_id}")
    async def session_validate(self, session_id: str, request: Request) -> dict[str, Any]:
        """Valid means yours and resumable (live, or stored and brought back on
        the next connect). Unknown ids and other people's answer alike."""
        from actors.sessions import find_session

        p = self._principal(request)
        if not _valid_session_id(session_id) or not await self._owned(session_id, p):
            return {"session_id": session_id, "valid": False}
        actor = await find_session(self.config, session_id, self.sessions.directory)
        if actor is None:
            assert self.store is not None  # without a store, owned implies live
            history, _ = await self.store.load(session_id)
            return {"session_id": session_id, "valid": True, "live": False, "history_messages": len(history)}
        stats = await actor.stats.remote()
        return {"session_id": session_id, "valid": True, "live": True, "turns": stats["turn_id"],
                "history_messages": stats["history_messages"]}

    @api.delete("/api/session/{session_id}")
    async def session_delete(self, session_id: str, request: Request) -> dict[str, Any]:
        """Ends the session if it is live and deletes its stored conversation."""
        p = self._principal(request)
        if not _valid_session_id(session_id) or not await self._owned(session_id, p):
            raise SessionNotFound(session_id)
        await self._forget_session(session_id)
        return {"session_id": session_id, "ended": True, "history_deleted": True}

    async def _forget_session(self, session_id: str) -> None:
        """End the session if it is live and delete its stored conversation."""
        from actors.sessions import find_session

        actor = await find_session(self.config, session_id, self.sessions.directory)
        if actor is not None:
            await self._end(actor, forget=True)
        if self.store is not None:
            await self.store.forget(session_id)

    @staticmethod
    async def _end(actor: Any, forget: bool = False) -> None:
        import ray

        try:
            await actor.close.remote(forget)
        except ray.exceptions.RayActorError:
            pass  # it exits while answering

    # ------------------------------------------------------------ voice sockets (actors/ingress/core.py)
    @api.websocket("/ws/voice")
    async def voice_socket(self, ws: WebSocket) -> None:
        await self.serve_native_socket(ws)

    @api.websocket("/xiaozhi/v1/")
    async def xiaozhi_socket(self, ws: WebSocket) -> None:
        await self.serve_xiaozhi_socket(ws)

    def _on_socket_accepted(self) -> None:
        self._drain_watch.ensure_started()

    async def _body_bytes(self, request: Request) -> bytes:
        return await request.body()  # the size was checked by BodyGuard, from the declared length

    # ------------------------------------------------------------ xiaozhi OTA and device admission
    @api.post(OTA_PATH)
    async def xiaozhi_ota(self, request: Request) -> dict[str, Any]:
        """The firmware's version check (actors/ingress/ota.py)."""
        return await answer_ota(self, request)

    @api.post(ACTIVATE_PATH)
    async def xiaozhi_activate_poll(self, request: Request) -> Response:
        return await activation_status(self, request)

    @api.post("/api/devices/activate")
    async def devices_activate(self, body: ActivateBody, request: Request) -> dict[str, Any]:
        """A user confirms the code their device shows; the device becomes theirs."""
        p = self._principal(request)
        if p.kind != "user":
            raise AuthError("auth.forbidden", "only a user can activate a device")
        ip_key = "ip:" + self._client_ip(request)
        self.login_failures.check("activate:" + p.key)
        device_id = await asyncio.to_thread(self.admission.registry.confirm, body.code, p.key)
        if device_id is None:  # a wrong guess costs like a wrong password
            self.login_failures.failed("activate:" + p.key)
            self.ip_failures.failed(ip_key)
            raise ApiError(404, "device.unknown_code", "no device is waiting with this code")
        return {"device_id": device_id, "owner": p.key, "activated": True}

    @api.get("/api/devices")
    async def devices_list(self, request: Request) -> dict[str, Any]:
        """Your devices (an admin sees every device)."""
        p = self._principal(request)
        owner = None if p.is_admin else p.key
        return {"devices": await asyncio.to_thread(self.admission.registry.list, owner)}

    # ------------------------------------------------------------ knowledge base
    async def _knowledge(self, call: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        from actors.agent.knowledge_api import KnowledgeAPIError

        try:
            return await call(self.config.knowledge, self.config.server.namespace, *args, **kwargs)
        except KnowledgeAPIError as e:
            raise ApiError(e.status, e.code, e.message) from None

    def _admin(self, request: Request) -> Principal:
        p = self._principal(request)
        if not p.is_admin:
            raise AuthError("auth.forbidden", "changing the knowledge base needs the admin role")
        return p

    @api.post("/api/knowledge/documents", status_code=201)
    async def knowledge_ingest(self, request: Request) -> dict[str, Any]:
        """Add (or replace) a Markdown or text document: `?name=&source=`, the
        document as the body. Admin only; every node's pool gets it."""
        from actors.agent.knowledge_api import ingest

        self._admin(request)
        q = request.query_params
        return await self._knowledge(ingest, q.get("name") or "", await request.body(),
                                     request.headers.get("content-type"), q.get("source"))

    @api.get("/api/knowledge/search")
    async def knowledge_search(self, request: Request) -> dict[str, Any]:
        """What a prompt would get for `q`: hits with scores and sources."""
        from actors.agent.knowledge_api import search

        p = self._principal(request)
        self.rate.check("knowledge:" + p.key)
        return await self._knowledge(search, request.query_params.get("q"), request.query_params.get("k"))

    @api.delete("/api/knowledge/documents/{name}")
    async def knowledge_remove(self, name: str, request: Request) -> dict[str, Any]:
        from actors.agent.knowledge_api import remove

        self._admin(request)
        return await self._knowledge(remove, name)

    @api.get("/api/knowledge/stats")
    async def knowledge_stats(self, request: Request) -> dict[str, Any]:
        from actors.agent.knowledge_api import stats

        self._admin(request)
        return await self._knowledge(stats)

    # ------------------------------------------------------------ long-term memory (yours and your devices')
    async def _memories(self, request: Request, call: Any, *args: Any, device_id: str | None = None
                        ) -> dict[str, Any]:
        """Run a memory_api handler for the caller; the owner is who
        authenticated, never a request field: the caller, or with `device_id`
        that device once the caller is found to own it (404 otherwise)."""
        from actors.agent.memory import MemoryStoreError
        from actors.agent.memory_api import device_owner

        p = self._principal(request)
        self.rate.check("memory:" + p.key)
        owner = p.key if device_id is None else device_owner(await self._own_device(p, device_id))
        store = self._memory_store
        try:
            if store is not None:
                await store.open()
            return await call(store, owner, *args)
        except MemoryStoreError as e:
            raise ApiError(e.http_status, e.code, e.message) from None

    @api.get("/api/memories")
    async def memories_list(self, request: Request) -> dict[str, Any]:
        from actors.agent.memory_api import list_memories

        q = request.query_params
        return await self._memories(request, list_memories, q.get("limit"), q.get("offset"))

    @api.get("/api/memories/export")
    async def memories_export(self, request: Request) -> JSONResponse:
        from actors.agent.memory_api import export_memories

        body = await self._memories(request, export_memories)
        return JSONResponse(body, headers={"Content-Disposition": "attachment; filename=memories.json"})

    @api.post("/api/memories", status_code=201)
    async def memories_add(self, request: Request) -> dict[str, Any]:
        from actors.agent.memory_api import add_memory

        return await self._memories(request, add_memory, await json_body(request))

    @api.delete("/api/memories/{memory_id}")
    async def memories_delete(self, memory_id: str, request: Request) -> dict[str, Any]:
        from actors.agent.memory_api import delete_memory

        return await self._memories(request, delete_memory, memory_id)

    @api.delete("/api/memories")
    async def memories_delete_all(self, request: Request) -> dict[str, Any]:
        from actors.agent.memory_api import delete_all_memories

        return await self._memories(request, delete_all_memories)

    # what a device remembered (principal device:<id>), managed by the device's owner
    @api.get("/api/devices/{device_id}/memories")
    async def device_memories_list(self, device_id: str, request: Request) -> dict[str, Any]:
        from actors.agent.memory_api import list_memories

        q = request.query_params
        return await self._memories(request, list_memories, q.get("limit"), q.get("offset"), device_id=device_id)

    @api.get("/api/devices/{device_id}/memories/export")
    async def device_memories_export(self, device_id: str, request: Request) -> JSONResponse:
        from actors.agent.memory_api import export_memories

        body = await self._memories(request, export_memories, device_id=device_id)
        return JSONResponse(body, headers={"Content-Disposition": "attachment; filename=device-memories.json"})

    @api.delete("/api/devices/{device_id}/memories/{memory_id}")
    async def device_memories_delete(self, device_id: str, memory_id: str, request: Request) -> dict[str, Any]:
        from actors.agent.memory_api import delete_memory

        return await self._memories(request, delete_memory, memory_id, device_id=device_id)

    @api.delete("/api/devices/{device_id}/memories")
    async def device_memories_delete_all(self, device_id: str, request: Request) -> dict[str, Any]:
        from actors.agent.memory_api import delete_all_memories

        return await self._memories(request, delete_all_memories, device_id=device_id)

    @api.patch("/api/devices/{device_id}")
    async def devices_update(self, device_id: str, body: DevicePatchBody, request: Request) -> dict[str, Any]:
        """Choose the persona a device speaks as (its owner or an admin); it
        applies from the device's next connection."""
        device_id = await self._own_device(self._principal(request), device_id)
        await asyncio.to_thread(self.admission.registry.set_persona, device_id, self._check_persona(body.persona))
        return {"device_id": device_id, "persona": body.persona}

    @api.delete("/api/devices/{device_id}")
    async def devices_revoke(self, device_id: str, request: Request) -> dict[str, Any]:
        """Revoke a device: its token stops opening sockets at once, and what
        it said and remembered is forgotten, so whoever activates it next
        (a new owner) starts from nothing."""
        from actors.agent.memory_api import delete_all_memories, device_owner

        p = self._principal(request)
        device_id = await self._own_device(p, device_id)
        if not await asyncio.to_thread(self.admission.registry.revoke, device_id):
            raise ApiError(404, "device.not_found", "no device with this id belongs to you")
        alias = device_owner(device_id)  # the device's principal, also its session's alias
        sid = await self.sessions.directory.lookup.remote(alias)
        if sid is not None:
            await self._forget_session(sid)
        deleted = {"deleted": 0}
        if self._memory_store is not None:  # the owner check passed above; the device is gone now
            await self._memory_store.open()
            deleted = await delete_all_memories(self._memory_store, alias)
        return {"device_id": device_id, "revoked": True, "history_deleted": sid is not None,
                "memories_deleted": deleted["deleted"]}

    async def _own_device(self, p: Principal, device_id: str) -> str:
        """The checked id of a device the caller owns (an admin: any device);
        someone else's device answers like an unknown one."""
        device_id, _ = check_device_ids(device_id, None)
        owner = await asyncio.to_thread(self.admission.registry.owner_of, device_id)
        if owner != p.key and not p.is_admin:
            raise ApiError(404, "device.not_found", "no device with this id belongs to you")
        return device_id

    @api.get(OTA_PATH)
    async def xiaozhi_ota_info(self, request: Request) -> dict[str, Any]:
        return ota_info(self, request)

    def _ws_url(self, request: Request, path: str) -> str:
        ingress = self.config.ingress
        if self._gateway is not None and (ingress.gateway_public_url or not ingress.public_url):
            return self._gateway.url(request.url.hostname, path)
        return self._ws_url_from(ingress.public_url, request, path)

    # ------------------------------------------------------------ control panel (issue 11)
    # GET /admin serves web/admin.html (static, no data in it; its script and style come from
    # /web/, section "web pages"); every /api/admin/* route checks the admin role here on the
    # server. Logic: actors/ingress/admin.py.
    def _init_control_panel(self) -> None:
        from actors.ingress.admin import AdminPanel

        self._admin_panel = AdminPanel(self.config, self.sessions, self.store, self.metrics,
                                       lambda: self.slots.in_use)

    def _admin_only(self, request: Request) -> Principal:
        """401 without a (valid) token, 403 `auth.forbidden` without the admin role."""
        p = self._principal(request)
        if not p.is_admin:
            raise AuthError("auth.forbidden", "the control panel needs the admin role")
        return p

    @staticmethod
    def _admin_session_id(session_id: str) -> str:
        if not _valid_session_id(session_id):
            raise ApiError(404, "session.not_found", "no live or stored session with this id")
        return session_id

    @api.get("/admin", include_in_schema=False)
    async def admin_page(self, request: Request) -> Response:
        return self._web_file("admin.html", request)

    @api.get("/api/admin/overview")
    async def admin_overview(self, request: Request) -> dict[str, Any]:
        """Sessions, pools, breakers, warm pool, errors and series in one answer (the panel's refresh)."""
        self._admin_only(request)
        return await self._admin_panel.overview()

    @api.get("/api/admin/sessions")
    async def admin_sessions(self, request: Request) -> dict[str, Any]:
        """Every live session in the cluster: owner, persona, state, turns, age, node."""
        self._admin_only(request)
        return await self._admin_panel.list_sessions()

    @api.get("/api/admin/sessions/{session_id}")
    async def admin_session_transcript(self, session_id: str, request: Request) -> dict[str, Any]:
        """A session's transcript, from its live actor or the store."""
        self._admin_only(request)
        found = await self._admin_panel.transcript(self._admin_session_id(session_id))
        if found is None:
            raise ApiError(404, "session.not_found", "no live or stored session with this id")
        return found

    @api.post("/api/admin/sessions/{session_id}/end")
    async def admin_session_end(self, session_id: str, request: Request) -> dict[str, Any]:
        """End a live session (its sockets close); its stored conversation stays."""
        self._admin_only(request)
        done = await self._admin_panel.end(self._admin_session_id(session_id))
        if done is None:
            raise ApiError(404, "session.not_found", "no live session with this id")
        return done

    @api.delete("/api/admin/sessions/{session_id}")
    async def admin_session_forget(self, session_id: str, request: Request) -> dict[str, Any]:
        """End the session if it is live and delete its stored conversation."""
        self._admin_only(request)
        done = await self._admin_panel.end(self._admin_session_id(session_id), forget=True)
        if done is None:
            raise ApiError(404, "session.not_found", "no live or stored session with this id")
        return done

    @api.get("/api/admin/pools")
    async def admin_pools(self, request: Request) -> dict[str, Any]:
        """Provider pools on every node, this replica's breakers, the warm pool."""
        self._admin_only(request)
        panel = self._admin_panel
        return {**await panel.pools(), "breakers": panel.breakers(), "warm_pool": await panel.warm_pool()}

    @api.get("/api/admin/errors")
    async def admin_errors(self, request: Request) -> dict[str, Any]:
        """Recent error events and refusals this replica saw, newest first."""
        self._admin_only(request)
        return self._admin_panel.errors()

    @api.get("/api/admin/series")
    async def admin_series(self, request: Request) -> dict[str, Any]:
        """Latency percentiles and live sessions over time (sampled every few seconds)."""
        self._admin_only(request)
        return self._admin_panel.series()

    @api.get("/api/admin/config")
    async def admin_config(self, request: Request) -> dict[str, Any]:
        """The effective configuration, every secret masked."""
        self._admin_only(request)
        return self._admin_panel.config_masked()


def with_secrets(config: AppConfig) -> AppConfig:
    """Fill unset signing secrets, so a fresh clone runs with auth on: from
    `auth.secrets_file` (made there once, mode 600, so tokens survive a
    restart), or random for this run when that is None. Every replica gets
    the same values through the bound config."""
    from pydantic import SecretStr

    from actors.ingress.secrets_file import load_or_create

    auth = config.auth
    missing = [name for name in ("jwt_secret", "device_secret") if getattr(auth, name) is None]
    if not missing:
        return config
    if auth.secrets_file is None:
        values = {name: secrets.token_urlsafe(32) for name in missing}
    else:
        values = load_or_create(config.resolve_path(auth.secrets_file), missing)
    updates = {name: SecretStr(value) for name, value in values.items()}
    return config.model_copy(update={"auth": auth.model_copy(update=updates)})


def build_app(config: AppConfig | None = None) -> serve.Application:
    """The application `serve deploy` / `serve run` import; refuses, naming the
    variable, a configured cloud provider whose key is missing."""
    from actors.config import ConfigError
    from actors.providers.registry import missing_keys, skipped_for_keys

    config = with_secrets(config or load_config())
    if problems := missing_keys(config):
        raise ConfigError("; ".join(problems))
    for skipped in skipped_for_keys(config):
        log.warning("%s", skipped)
    ing = config.ingress
    # max_surge_percent: on an upgrade the new replicas start before the old ones drain, so the
    # clients told `goodbye` (actors/ingress/drain.py) find a replica ready at once
    options: dict[str, Any] = {"max_ongoing_requests": ing.max_ongoing_requests,
                               "graceful_shutdown_timeout_s": ing.graceful_shutdown_timeout_s,
                               "max_surge_percent": 100}
    if ing.max_replicas > ing.min_replicas:
        options["autoscaling_config"] = {"min_replicas": ing.min_replicas, "max_replicas": ing.max_replicas,
                                         "target_ongoing_requests": ing.target_ongoing_requests}
    else:
        options["num_replicas"] = ing.min_replicas
    return VoiceIngress.options(**options).bind(config)


app = build_app()
