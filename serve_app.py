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

from fastapi import Body, FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from ray import serve

from actors.auth import Authenticator, AuthError, Principal
from actors.config import AppConfig, load_config
from actors.limits import LimitError, RateLimiter, SessionSlots, check_size

log = logging.getLogger("voice_actors.ingress")

api = FastAPI(
    title="voice-actors",
    version="0.1.0",
    description="Real-time voice sessions as Ray actors. WebSocket protocols: `/ws/voice` (native, "
                "docs/protocol.md), `/xiaozhi/v1/` (xiaozhi-esp32), `/ws/text/stream` (text only).",
)


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


@api.exception_handler(ApiError)
async def _api_error(_: Request, e: ApiError) -> JSONResponse:
    return _error(e.status, e.code, e.message)


@api.exception_handler(AuthError)
async def _auth_error(_: Request, e: AuthError) -> JSONResponse:
    return _error(e.http_status, e.code, e.message, {"WWW-Authenticate": "Bearer"} if e.http_status == 401 else None)


@api.exception_handler(LimitError)
async def _limit_error(_: Request, e: LimitError) -> JSONResponse:
    headers = {"Retry-After": str(max(1, round(e.retry_after_s)))} if e.retry_after_s else None
    return _error(e.http_status, e.code, e.message, headers)


@api.exception_handler(RequestValidationError)
async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
    first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
    where = ".".join(str(p) for p in first["loc"])
    return _error(422, "request.invalid", f"{where}: {first['msg']}")


# ------------------------------------------------------------------ bodies
class LoginBody(BaseModel):
    username: str = Field(min_length=1, max_length=128)
    password: str = Field(min_length=1, max_length=1024)


class TextBody(BaseModel):
    text: str = Field(min_length=1, max_length=4000)
    session_id: str | None = Field(None, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")


class BatchBody(BaseModel):
    texts: list[str] = Field(min_length=1, max_length=32)
    session_id: str | None = Field(None, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")


class TTSBody(BaseModel):
    text: str = Field(min_length=1, max_length=4000)
    sample_rate: int = Field(16000, ge=8000, le=48000)


class VoiceStartBody(BaseModel):
    session_id: str | None = Field(None, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")


class VoiceEndBody(BaseModel):
    session_id: str = Field(max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")


@serve.deployment(max_ongoing_requests=1000, graceful_shutdown_timeout_s=120)
@serve.ingress(api)
class VoiceIngress:
    def __init__(self, config: AppConfig) -> None:
        from actors.ingress_metrics import IngressMetrics
        from actors.pools import ensure_pools
        from actors.sessions import SessionManager

        self.config = config
        ensure_pools(config)
        self.sessions = SessionManager(config)
        self.auth = Authenticator(config.auth)
        self.rate = RateLimiter(config.limits.requests_per_minute, config.limits.burst)
        self.slots = SessionSlots(config.limits.max_sessions, config.limits.max_sessions_per_client)
        self.metrics = IngressMetrics()

    # ------------------------------------------------------------ helpers
    def _principal(self, request: Request | WebSocket, client_id: str | None = None,
                   device_id: str | None = None) -> Principal:
        token = Authenticator.token_from(request.headers, request.query_params)
        principal = self.auth.authenticate(token, client_id, device_id)
        self.rate.check(principal.subject if principal.kind != "anonymous" else self._client_ip(request))
        return principal

    @staticmethod
    def _client_ip(request: Request | WebSocket) -> str:
        return request.client.host if request.client else "unknown"

    async def _body_bytes(self, request: Request) -> bytes:
        declared = int(request.headers.get("content-length") or 0)
        check_size(declared, self.config.limits.max_request_bytes, "request body")
        data = await request.body()
        check_size(len(data), self.config.limits.max_request_bytes, "request body")
        return data

    async def _open(self, session_id: str | None, owner: str, alias: str | None = None) -> tuple[str, Any, bool]:
        """Open or resume a session (by id, or by a stable alias such as a
        device id); refuses one that belongs to someone else."""
        from actors.sessions import find_session

        if alias is not None:
            sid, actor, resumed = await self.sessions.open_alias(alias)
        else:
            resumed = bool(session_id) and find_session(self.config, session_id) is not None
            sid, actor = await asyncio.to_thread(self.sessions.open, session_id)
        if not await actor.claim.remote(owner):
            raise AuthError("auth.forbidden_session", "this session belongs to another client")
        return sid, actor, resumed

    async def _existing(self, session_id: str, owner: str) -> Any:
        from actors.sessions import find_session

        actor = find_session(self.config, session_id)
        if actor is None:
            raise ApiError(404, "session.not_found", f"no live session {session_id}")
        if not await actor.claim.remote(owner):
            raise AuthError("auth.forbidden_session", "this session belongs to another client")
        return actor

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
    async def health(self) -> dict[str, Any]:
        return {"status": "ok", "sockets": self.slots.in_use, "warm_sessions_ready": self.sessions.warm_ready(),
                "warm_sessions_target": self.sessions.warm_target}

    @api.get("/metrics")
    async def prometheus(self) -> Response:
        body, content_type = self.metrics.render()
        return Response(body, media_type=content_type)

    # ------------------------------------------------------------ auth
    @api.post("/api/auth/login")
    async def login(self, body: LoginBody, request: Request) -> dict[str, Any]:
        self.rate.check("login:" + self._client_ip(request))
        token = await asyncio.to_thread(self.auth.login, body.username, body.password)
        return {"access_token": token, "token_type": "bearer", "expires_in": self.config.auth.token_ttl_s}

    @api.get("/api/auth/me")
    async def me(self, request: Request) -> dict[str, Any]:
        p = self._principal(request)
        return {"subject": p.subject, "kind": p.kind, "roles": list(p.roles), "expires_at": p.expires_at}

    # ------------------------------------------------------------ text
    @api.post("/api/text/process")
    async def text_process(self, body: TextBody, request: Request) -> dict[str, Any]:
        p = self._principal(request)
        sid, actor, _ = await self._open(body.session_id, p.subject)
        await actor.configure_output.remote(speak=False)

        async def send() -> bool:
            return await actor.send_text.remote(body.text) is not None

        return self._turn_json(sid, await self._turn(actor, send))

    @api.post("/api/text/batch")
    async def text_batch(self, body: BatchBody, request: Request) -> dict[str, Any]:
        """Texts answered in order in one session, so later ones see earlier ones."""
        p = self._principal(request)
        sid, actor, _ = await self._open(body.session_id, p.subject)
        await actor.configure_output.remote(speak=False)
        results = []
        for text in body.texts:
            async def send(text: str = text) -> bool:
                return await actor.send_text.remote(text) is not None

            results.append(self._turn_json(sid, await self._turn(actor, send)))
        return {"session_id": sid, "results": results}

    @api.websocket("/ws/text/stream")
    async def text_stream(self, ws: WebSocket) -> None:
        from actors.protocols.text_stream import TextStreamProtocol

        await self._socket(ws, TextStreamProtocol(), owner_from=None)

    # ------------------------------------------------------------ audio
    @api.post("/api/audio/stt")
    async def audio_stt(self, request: Request) -> dict[str, Any]:
        from actors.pools import get_pool

        self._principal(request)
        pcm = await self._decode_upload(request)
        started = time.perf_counter()
        text = await get_pool("stt", self.config.stt.provider, self.config).transcribe.remote(pcm)
        return {"text": text, "duration_s": round(len(pcm) / 32000, 3),
                "latency_ms": round((time.perf_counter() - started) * 1000, 1)}

    @api.post("/api/audio/tts")
    async def audio_tts(self, body: TTSBody, request: Request) -> Response:
        from actors.audio import resample_pcm16, wav_bytes
        from actors.pools import get_pool

        self._principal(request)
        seg = await get_pool("tts", self.config.tts.provider, self.config).synthesize.remote(body.text)
        pcm = resample_pcm16(seg.pcm16, seg.sample_rate, body.sample_rate)
        return Response(wav_bytes(pcm, body.sample_rate), media_type="audio/wav")

    @api.post("/api/audio/process")
    async def audio_process(self, request: Request) -> dict[str, Any]:
        """One spoken turn over HTTP: audio file in, transcript + reply + reply WAV (base64) out."""
        from actors.audio import silence, split_frames, wav_bytes
        from actors.sessions import send_utterance

        p = self._principal(request)
        pcm = await self._decode_upload(request)
        sid, actor, _ = await self._open(request.query_params.get("session_id"), p.subject)
        await actor.configure_output.remote(speak=True, pace=False)
        frames = split_frames(pcm + silence(1500), 60)
        try:
            result = await self._turn(actor, lambda: send_utterance(actor, frames))
        finally:
            await actor.configure_output.remote(pace=self.config.tts.pace)
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
        try:
            return await asyncio.to_thread(decode_upload, data, content_type, filename,
                                           int(rate) if rate and rate.isdigit() else None)
        except AudioFormatError as e:
            raise ApiError(415, "audio.unsupported_format", str(e)) from None

    # ------------------------------------------------------------ sessions
    @api.post("/api/voice/start")
    async def voice_start(self, request: Request, body: VoiceStartBody = Body(default=VoiceStartBody())) -> dict:
        p = self._principal(request)
        sid, _, resumed = await self._open(body.session_id, p.subject)
        return {"session_id": sid, "resumed": resumed, "websocket": {"url": self._ws_url(request, "/ws/voice"),
                                                                     "protocol": "voice-actors/1"}}

    @api.post("/api/voice/end")
    async def voice_end(self, body: VoiceEndBody, request: Request) -> dict[str, Any]:
        p = self._principal(request)
        await self._end(await self._existing(body.session_id, p.subject))
        return {"session_id": body.session_id, "ended": True}

    @api.get("/api/session/validate/{session_id}")
    async def session_validate(self, session_id: str, request: Request) -> dict[str, Any]:
        p = self._principal(request)
        try:
            actor = await self._existing(session_id, p.subject)
        except ApiError:
            return {"session_id": session_id, "valid": False}
        stats = await actor.stats.remote()
        return {"session_id": session_id, "valid": True, "turns": stats["turn_id"],
                "history_messages": stats["history_messages"]}

    @api.delete("/api/session/{session_id}")
    async def session_delete(self, session_id: str, request: Request) -> dict[str, Any]:
        """Ends the session and deletes its stored conversation."""
        p = self._principal(request)
        await self._end(await self._existing(session_id, p.subject), forget=True)
        return {"session_id": session_id, "ended": True, "history_deleted": True}

    @staticmethod
    async def _end(actor: Any, forget: bool = False) -> None:
        import ray

        try:
            await actor.close.remote(forget)
        except ray.exceptions.RayActorError:
            pass  # it exits while answering

    # ------------------------------------------------------------ voice sockets
    @api.websocket("/ws/voice")
    async def voice_socket(self, ws: WebSocket) -> None:
        from actors.protocols.native import NativeProtocol

        await self._socket(ws, NativeProtocol(self.config.session.max_frame_bytes), owner_from=None)

    @api.websocket("/xiaozhi/v1/")
    async def xiaozhi_socket(self, ws: WebSocket) -> None:
        from actors.protocols.base import ProtocolError
        from actors.protocols.xiaozhi import XiaozhiProtocol

        version = ws.headers.get("protocol-version") or ws.query_params.get("protocol-version") or "1"
        try:
            adapter = XiaozhiProtocol(int(version) if version.isdigit() else -1,
                                      self.config.ingress.xiaozhi_output_sample_rate,
                                      self.config.session.max_frame_bytes)
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
        from actors.connection import VoiceConnection

        await ws.accept()
        client_id, device_id = owner_from if owner_from else (None, None)
        try:
            principal = self._principal(ws, client_id, device_id)
            slot = self.slots.acquire(principal.subject)
        except (AuthError, LimitError) as e:
            self.metrics.refused(e.code)
            await ws.close(e.ws_close_code, e.code)
            return
        # a device keeps one session across reconnects; others resume by id in hello
        alias = f"device:{device_id.lower()}" if device_id else None

        async def open_session(session_id: str | None) -> tuple[str, Any, bool]:
            return await self._open(session_id, principal.subject, alias)

        self.metrics.connected(adapter.name)
        try:
            await VoiceConnection(ws, adapter, open_session, self.config, self.metrics.observe).serve()
        except AuthError as e:
            await ws.close(e.ws_close_code, e.code)
        finally:
            slot.release()
            self.metrics.disconnected(adapter.name)

    # ------------------------------------------------------------ xiaozhi OTA
    @api.post("/xiaozhi/ota/")
    async def xiaozhi_ota(self, request: Request) -> dict[str, Any]:
        device_id = request.headers.get("device-id") or request.query_params.get("device-id")
        client_id = request.headers.get("client-id") or request.query_params.get("client-id") or ""
        if not device_id:
            raise ApiError(400, "xiaozhi.missing_device_id", "the Device-Id header is required")
        allow = self.config.auth.device_allowlist
        if allow is not None and device_id.lower() not in {d.lower() for d in allow}:
            raise AuthError("auth.forbidden_device")
        self.rate.check("ota:" + device_id)
        try:
            body = await request.json()
        except ValueError:
            body = {}
        version = (body.get("application") or {}).get("version", "0.0.0") if isinstance(body, dict) else "0.0.0"
        token = ""
        if self.config.auth.enabled and self.config.auth.device_secret is not None:
            token = self.auth.issue_device_token(client_id, device_id)
        return {
            "server_time": {"timestamp": int(time.time() * 1000), "timezone_offset": 0},
            "firmware": {"version": version, "url": ""},
            "websocket": {"url": self._ws_url(request, "/xiaozhi/v1/"), "token": token},
        }

    @api.get("/xiaozhi/ota/")
    async def xiaozhi_ota_info(self, request: Request) -> dict[str, Any]:
        return {"websocket": {"url": self._ws_url(request, "/xiaozhi/v1/")}, "method": "POST with Device-Id"}

    @staticmethod
    def _header_or_query(ws: WebSocket, *names: str) -> str | None:
        """Firmware that cannot set headers sends them in the query string."""
        for n in names:
            value = ws.headers.get(n) or ws.query_params.get(n)
            if value:
                return value
        return None

    def _ws_url(self, request: Request, path: str) -> str:
        base = self.config.ingress.public_url
        if base:
            return base.rstrip("/") + path
        scheme = "wss" if request.url.scheme == "https" else "ws"
        return f"{scheme}://{request.url.netloc}{path}"


def with_secrets(config: AppConfig) -> AppConfig:
    """Fill unset signing secrets with random ones for this deployment, so a
    fresh clone runs with auth on; every replica gets the same values."""
    from pydantic import SecretStr

    auth = config.auth
    updates: dict[str, Any] = {}
    if auth.jwt_secret is None:
        updates["jwt_secret"] = SecretStr(secrets.token_urlsafe(32))
    if auth.device_secret is None:
        updates["device_secret"] = SecretStr(secrets.token_urlsafe(32))
    if not updates:
        return config
    return config.model_copy(update={"auth": auth.model_copy(update=updates)})


def build_app(config: AppConfig | None = None) -> serve.Application:
    config = with_secrets(config or load_config())
    ing = config.ingress
    options: dict[str, Any] = {"max_ongoing_requests": ing.max_ongoing_requests,
                               "graceful_shutdown_timeout_s": ing.graceful_shutdown_timeout_s}
    if ing.max_replicas > ing.min_replicas:
        options["autoscaling_config"] = {"min_replicas": ing.min_replicas, "max_replicas": ing.max_replicas,
                                         "target_ongoing_requests": ing.target_ongoing_requests}
    else:
        options["num_replicas"] = ing.min_replicas
    return VoiceIngress.options(**options).bind(config)


app = build_app()
