"""A tiny MCP server for tests, spoken to over stdio, or over streamable
HTTP at http://127.0.0.1:PORT/mcp (only 127.0.0.1 is ever bound; with
`--token`, a request without `Authorization: Bearer TOKEN` is refused 401,
which checks that the client sends its configured headers):

    python -m tests.fakes.mcp_server
    python -m tests.fakes.mcp_server --http-port 18900 [--token secret]

Tools: `add` (a result), `shout` (text back), `fail` (an error result) and
`slow` (sleeps, for timeouts and cancellation; it writes a marker file when
it is cancelled, if VA_MCP_MARKER names one).
"""

from __future__ import annotations

import argparse
import asyncio
import os
from typing import Any

from mcp.server.mcpserver import MCPServer

HOST = "127.0.0.1"

server = MCPServer("fake-tools")


@server.tool(description="Add two integers.")
def add(a: int, b: int) -> str:
    return str(a + b)


@server.tool(description="Say the text in capitals.")
def shout(text: str) -> str:
    return text.upper() + "!"


@server.tool(description="Always fails.")
def fail() -> str:
    raise ValueError("the fake tool broke")


@server.tool(description="Wait, then answer.")
async def slow(seconds: float) -> str:
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        marker = os.environ.get("VA_MCP_MARKER")
        if marker:
            with open(marker, "w") as f:
                f.write("cancelled")
        raise
    return "done"


def require_bearer(app: Any, token: str) -> Any:
    """`app` (ASGI) behind a bearer token; lifespan events pass through, so
    the MCP session manager still starts and stops with the server."""
    from starlette.responses import JSONResponse

    expected = f"Bearer {token}".encode()

    async def guarded(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and dict(scope["headers"]).get(b"authorization") != expected:
            await JSONResponse({"error": "unauthorized"}, status_code=401)(scope, receive, send)
            return
        await app(scope, receive, send)

    return guarded


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--http-port", type=int, help="serve streamable HTTP on 127.0.0.1:PORT/mcp, not stdio")
    parser.add_argument("--token", help="with --http-port: the bearer token every request must carry")
    args = parser.parse_args(argv)
    if args.http_port is None:
        server.run("stdio")
        return
    import uvicorn

    app = server.streamable_http_app(host=HOST)
    uvicorn.run(require_bearer(app, args.token) if args.token else app, host=HOST, port=args.http_port,
                log_level="warning")


if __name__ == "__main__":
    main()
