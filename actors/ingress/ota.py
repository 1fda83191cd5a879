"""The xiaozhi firmware's OTA check: where a device learns its socket URL and
token, or the activation code its owner must confirm (docs/security.md).

Both kinds of process that take callers answer it with this one code: Serve's
replica (serve_app.py) and the per-node device gateway on its own port
(actors/ingress/gateway.py), where a device's boot-time request skips the
Serve proxy's hop as its socket does (docs/benchmarks.md, "OTA on the
gateway's port").
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from actors.ingress.auth import check_device_ids
from actors.ingress.core import ApiError, IngressCore
from actors.ingress.http_guard import json_body

OTA_PATH = "/xiaozhi/ota/"
ACTIVATE_PATH = "/xiaozhi/ota/activate"
SOCKET_PATH = "/xiaozhi/v1/"


def device_headers(request: Request) -> tuple[str, str]:
    """(device id, client id) from the firmware's headers (or the query, for
    browser pages), checked; a missing device id is refused."""
    device_id = request.headers.get("device-id") or request.query_params.get("device-id")
    client_id = request.headers.get("client-id") or request.query_params.get("client-id")
    if not device_id:
        raise ApiError(400, "xiaozhi.missing_device_id", "the Device-Id header is required")
    device, client = check_device_ids(device_id, client_id or device_id)
    assert device is not None and client is not None
    return device, client


async def answer_ota(core: IngressCore, request: Request) -> dict[str, Any]:
    """An admitted device gets its WebSocket URL and token; any other gets an
    activation code to show or speak, and no token until its owner confirms it."""
    device_id, client_id = device_headers(request)
    ip = core._client_ip(request)
    core.rate.check("ota:ip:" + ip)
    core.rate.check("ota:" + device_id)
    body = await json_body(request)
    application = body.get("application") if isinstance(body, dict) else None
    version = application.get("version") if isinstance(application, dict) else None
    decision = await asyncio.to_thread(core.admission.on_ota, device_id, client_id, ip)
    answer: dict[str, Any] = {
        "server_time": {"timestamp": int(time.time() * 1000), "timezone_offset": 0},
        "firmware": {"version": version if isinstance(version, str) and len(version) <= 32 else "0.0.0", "url": ""},
    }
    if decision.activation is not None:
        code = decision.activation.code
        answer["activation"] = {"code": code, "message": f"{core._public_host(request)}\n{code}",
                                "challenge": decision.activation.challenge, "timeout_ms": 30000}
        return answer
    token = ""
    if core.config.auth.enabled and core.config.auth.device_secret is not None:
        token = core.auth.issue_device_token(client_id, device_id)
    answer["websocket"] = {"url": core._ws_url(request, SOCKET_PATH), "token": token}
    return answer


async def activation_status(core: IngressCore, request: Request) -> JSONResponse:
    """The firmware polls while it shows its code: 202 while it waits, 200 once
    its owner confirmed it (then it asks OTA again)."""
    device_id, _ = device_headers(request)
    core.rate.check("ota:" + device_id)
    if await asyncio.to_thread(core.admission.registry.is_admitted, device_id):
        return JSONResponse({"status": "activated"}, status_code=200)
    return JSONResponse({"status": "waiting"}, status_code=202)


def ota_info(core: IngressCore, request: Request) -> dict[str, Any]:
    """A GET (a person or a browser page checking the address): where devices connect."""
    return {"websocket": {"url": core._ws_url(request, SOCKET_PATH)}, "method": "POST with Device-Id"}
