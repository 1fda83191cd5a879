"""The per-node device gateway: voice sockets served without the Serve proxy.

Through Serve, each WebSocket message crosses a process twice before it
reaches the session actor: the proxy takes the socket and hands every
message to the ingress replica as a Ray call. The gateway is one Ray actor
per node running a plain ASGI server (uvicorn) on `ingress.gateway_port`: a
device's socket ends in it, and its frames go straight to the session actor.
It runs the same socket code as the replica (`IngressCore`: auth, device
admission, caps, drain), so the two cannot disagree. It answers the
firmware's OTA too (actors/ingress/ota.py, the replica's code): a device whose
OTA URL names this port skips the Serve hop at boot as well. The HTTP API and
the web pages stay on Serve. Measured in docs/benchmarks.md ("Device
sockets without the Serve proxy").

Lifetime. The gateway is detached and named per node, configuration and
code, so every replica on a node shares one, and a redeploy of the same
configuration and code keeps its sockets. Replicas renew its lease; a gateway whose
lease lapses (the app deleted, every replica gone) or that a replica with a
new configuration replaces stops listening at once, says `goodbye` on each
socket (after the reply in flight, within `server.drain_grace_s`) and exits.
Session actors live outside it: a device that reconnects resumes its session.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import threading
import time
from pathlib import Path
from typing import Any

import ray

from actors.config import AppConfig
from actors.ingress.core import IngressCore

log = logging.getLogger(__name__)

NAME_PREFIX = "device-gateway:"
LEASE_S = 30.0
"""A gateway no replica has renewed for this long retires (the app is gone)."""
RENEW_S = 5.0
BIND_TRIES_S = 10.0
"""How long a new gateway retries its port while a retiring one lets it go."""
READ_LIMIT_BYTES = 1 << 20
"""The most of one WebSocket message the gateway reads: up to it, a message over
`limits.max_ws_message_bytes` gets the same `limit.too_large` error as through
Serve and the socket lives on; past it the socket closes 1009 before the rest
is read (through Serve, the proxy reads up to 16 MiB first)."""
RETIRE_EXTRA_S = 5.0
"""Past the drain grace: the sockets' goodbye and close, before the exit."""


def config_fingerprint(config: AppConfig) -> str:
    """Which configuration and code a gateway serves: a replica with another
    replaces it (a new config, or an upgrade installed on the node). The
    signing secrets count too (the JSON masks them): a gateway left with
    rotated-out secrets would refuse every new token."""
    secrets = [s.get_secret_value() if s is not None else "" for s in (config.auth.jwt_secret,
                                                                      config.auth.device_secret)]
    digest = hashlib.sha256(config.model_dump_json().encode() + _code_digest())
    for secret in secrets:
        digest.update(hashlib.sha256(secret.encode()).digest())
    return digest.hexdigest()[:12]


@functools.cache
def _code_digest() -> bytes:
    import actors

    digest = hashlib.sha256()
    for path in sorted(Path(actors.__file__).parent.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.digest()


def gateway_name(node_id: str, fingerprint: str) -> str:
    return f"{NAME_PREFIX}{node_id}:{fingerprint}"


class DeviceGateway(IngressCore):
    """The actor (see the module's docstring)."""

    def __init__(self, config: AppConfig) -> None:
        super().__init__(config)
        self._server: Any = None
        self._serving: asyncio.Task[None] | None = None
        self._renewed = time.monotonic()
        self._retiring = False

    async def start(self) -> int:
        """Listen on `server.host`:`ingress.gateway_port`; → the port. Tries
        for a while: a gateway being replaced may still hold it."""
        import uvicorn

        if self._server is not None and self._server.started:
            return int(self.config.ingress.gateway_port)
        from uvicorn.protocols.http.auto import AutoHTTPProtocol

        from actors.ingress.connection_guard import PendingConnections, guarded_protocol

        app = self._app()
        ingress, limits = self.config.ingress, self.config.limits
        # uvicorn waits forever for a request that does not come: each connection gets a deadline
        http = guarded_protocol(AutoHTTPProtocol, PendingConnections(limits.pending_connections_per_address,
                                                                     limits.max_pending_connections),
                                limits.request_read_s, self.metrics.refused)
        deadline = time.monotonic() + BIND_TRIES_S
        while True:
            server = uvicorn.Server(uvicorn.Config(
                # no permessage-deflate: audio does not compress, and each socket's zlib state (~300 KB)
                # lived until the cycle collector reached the closed connection (docs/reliability.md).
                # websockets' sans-I/O protocol: uvicorn's default, its legacy one is deprecated (same CPU)
                app, host=self.config.server.host, port=ingress.gateway_port, ws="websockets-sansio", loop="none",
                http=http, ws_per_message_deflate=False,
                lifespan="off", log_level="warning", ws_max_size=max(READ_LIMIT_BYTES, limits.max_ws_message_bytes),
                timeout_graceful_shutdown=self.config.server.drain_grace_s + RETIRE_EXTRA_S))
            serving = asyncio.get_running_loop().create_task(server.serve())
            while not server.started and not serving.done():
                await asyncio.sleep(0.02)
            if server.started:
                self._server, self._serving = server, serving
                asyncio.get_running_loop().create_task(self._watch_lease())
                return int(ingress.gateway_port)
            if time.monotonic() >= deadline:  # uvicorn logged why (the port is taken)
                raise RuntimeError(f"device gateway: cannot listen on {self.config.server.host}:"
                                   f"{ingress.gateway_port}")
            await asyncio.sleep(0.25)

    def _app(self) -> Any:
        """The two socket routes and the firmware's OTA, with the replica's body
        limits, CORS (browser test pages ask OTA) and error envelope."""
        from starlette.applications import Starlette
        from starlette.middleware import Middleware
        from starlette.responses import JSONResponse
        from starlette.routing import Route, WebSocketRoute

        from actors.ingress import http_guard
        from actors.ingress.http_errors import ERROR_HANDLERS
        from actors.ingress.ota import ACTIVATE_PATH, OTA_PATH, SOCKET_PATH, activation_status, answer_ota, ota_info

        limits = self.config.limits
        http_guard.configure(limits.max_json_bytes, limits.max_request_bytes, (), self.config.ingress.cors_allowed_origins)

        async def ota(request: Any) -> JSONResponse:
            if request.method == "GET":
                return JSONResponse(ota_info(self, request))
            return JSONResponse(await answer_ota(self, request))

        async def activate(request: Any) -> JSONResponse:
            return await activation_status(self, request)

        return Starlette(
            routes=[WebSocketRoute(SOCKET_PATH, self.serve_xiaozhi_socket),
                    WebSocketRoute("/ws/voice", self.serve_native_socket),
                    Route(OTA_PATH, ota, methods=["GET", "POST"]), Route(ACTIVATE_PATH, activate, methods=["POST"])],
            middleware=[Middleware(http_guard.Cors), Middleware(http_guard.BodyGuard)],
            exception_handlers=ERROR_HANDLERS)

    def _ws_url(self, request: Any, path: str) -> str:
        """This gateway, as the device reached it (or `ingress.gateway_public_url`)."""
        return self._ws_url_from(self.config.ingress.gateway_public_url, request, path)

    def _public_host(self, request: Any) -> str:
        """The HTTP API and pages are on Serve's port, not this one."""
        host = request.url.hostname or "localhost"
        return self.config.ingress.public_url or f"http://{f'[{host}]' if ':' in host else host}:{self.config.server.port}"

    def renew(self) -> None:
        self._renewed = time.monotonic()

    def stats(self) -> dict[str, Any]:
        """For /health: whether it listens, its sockets and its warm pool."""
        return {"listening": bool(self._server is not None and self._server.started and not self._retiring),
                "port": self.config.ingress.gateway_port, "sockets": self.drain.open_connections,
                "warm_sessions_ready": self.sessions.warm_ready(), "warm_sessions_target": self.sessions.warm_target}

    async def retire(self) -> None:
        """Stop listening now (the port is free for the gateway that replaces
        this one), goodbye on every socket, exit once they closed."""
        if self._retiring:
            return
        self._retiring = True
        log.info("device gateway retiring: %d socket(s) told goodbye", self.drain.open_connections)
        if self._server is not None:
            for listener in self._server.servers:
                listener.close()
        self.drain.start()
        asyncio.get_running_loop().create_task(self._exit_when_drained())

    async def _exit_when_drained(self) -> None:
        deadline = time.monotonic() + self.config.server.drain_grace_s + RETIRE_EXTRA_S
        while self.drain.open_connections and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        self.sessions.shutdown()
        ray.actor.exit_actor()

    async def _watch_lease(self) -> None:
        while not self._retiring:
            await asyncio.sleep(RENEW_S)
            if time.monotonic() - self._renewed > LEASE_S:
                log.info("device gateway: no replica renewed its lease for %.0f s", LEASE_S)
                await self.retire()


DeviceGatewayActor = ray.remote(num_cpus=0, max_restarts=0, max_concurrency=10_000)(DeviceGateway)


class GatewayLease:
    """A replica's hold on its node's gateway: started (or found) on this
    node, stale ones replaced, the lease renewed from a thread."""

    def __init__(self, config: AppConfig) -> None:
        self.config = config
        self.node_id = ray.get_runtime_context().get_node_id()
        self.node_ip = ray.util.get_node_ip_address()
        self.other_node_ips = self._other_node_ips()
        self.handle = self._ensure()
        threading.Thread(target=self._renew, name="gateway-lease", daemon=True).start()

    def _ensure(self, replace_others: bool = True) -> Any:
        """This node's gateway for this configuration, started if need be;
        None when another one serves the node and `replace_others` is False."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        namespace = self.config.server.namespace
        mine = gateway_name(self.node_id, config_fingerprint(self.config))
        for entry in ray.util.list_named_actors(all_namespaces=True):
            name = entry["name"]
            if entry["namespace"] == namespace and name.startswith(f"{NAME_PREFIX}{self.node_id}:") and name != mine:
                if not replace_others:
                    return None
                # another configuration's or release's: it stops listening before this one binds
                with contextlib.suppress(ray.exceptions.RayActorError, ValueError):  # gone meanwhile
                    ray.get(ray.get_actor(name, namespace=namespace).retire.remote(), timeout=30)
        handle = DeviceGatewayActor.options(
            name=mine, namespace=namespace, lifetime="detached", get_if_exists=True,
            scheduling_strategy=NodeAffinitySchedulingStrategy(self.node_id, soft=False)).remote(self.config)
        ray.get(handle.start.remote(), timeout=120)
        return handle

    def _renew(self) -> None:
        """Renew the lease; a gateway that died (it is not restarted by Ray:
        listening is a step after its start) is made again here, so devices
        are away at most one renewal period plus its start. One retired for
        a newer configuration is not: this replica is on its way out."""
        while True:
            time.sleep(RENEW_S)
            try:
                self.other_node_ips = self._other_node_ips()
                ray.get(self.handle.renew.remote(), timeout=RENEW_S)
            except ray.exceptions.RayActorError:
                try:
                    handle = self._ensure(replace_others=False)
                except Exception:  # tried again next period
                    continue
                if handle is None:
                    return  # a newer replica's gateway serves the node now
                log.warning("device gateway on this node died; started it again")
                self.handle = handle
            except ray.exceptions.GetTimeoutError:
                continue  # busy: renewed next time, well within the lease
            except Exception:  # Ray shutting down: the thread ends with the process
                return

    def _other_node_ips(self) -> frozenset[str]:
        return frozenset(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]) - {self.node_ip}

    def url(self, request_host: str | None, path: str) -> str:
        """The socket URL to hand a device that reached this replica as
        `request_host`: that host (the way the device reaches this machine),
        unless it is another node's address (Serve's proxy there sent the
        request here), then this node's; `ingress.gateway_public_url` when
        set (a NAT or a TLS terminator in front)."""
        ingress = self.config.ingress
        if ingress.gateway_public_url:
            return ingress.gateway_public_url.rstrip("/") + path
        host = request_host if request_host and request_host not in self.other_node_ips else self.node_ip
        if ":" in host:
            host = f"[{host}]"
        return f"ws://{host}:{ingress.gateway_port}{path}"
