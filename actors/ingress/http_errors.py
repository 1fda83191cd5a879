"""One error envelope, `{"error": {"code", "message"}}`, for every refusal an
HTTP route raises, in each process that serves routes (Serve's replica and
the device gateway's OTA), so a client reads the same answer from either."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from actors.ingress.auth import AuthError
from actors.ingress.core import ApiError
from actors.ingress.limits import LimitError


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


async def api_error(_: Request, e: Exception) -> JSONResponse:
    assert isinstance(e, ApiError)
    return error_response(e.status, e.code, e.message)


async def auth_error(_: Request, e: Exception) -> JSONResponse:
    assert isinstance(e, AuthError)
    return error_response(e.http_status, e.code, e.message,
                          {"WWW-Authenticate": "Bearer"} if e.http_status == 401 else None)


async def limit_error(_: Request, e: Exception) -> JSONResponse:
    assert isinstance(e, LimitError)
    headers = {"Retry-After": str(max(1, round(e.retry_after_s)))} if e.retry_after_s else None
    return error_response(e.http_status, e.code, e.message, headers)


async def http_error(_: Request, e: Exception) -> JSONResponse:
    """The framework's own refusals (unknown path, wrong method, a body it
    could not parse) in the same envelope as ours, never `{"detail": ...}`."""
    assert isinstance(e, HTTPException)
    return error_response(e.status_code, f"http.{e.status_code}", str(e.detail), dict(e.headers or {}) or None)


ERROR_HANDLERS: dict[Any, Callable[[Request, Exception], Awaitable[JSONResponse]]] = {
    ApiError: api_error, AuthError: auth_error, LimitError: limit_error, HTTPException: http_error}
