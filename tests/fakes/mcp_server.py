"""A tiny MCP server for tests, spoken to over stdio:

    python -m tests.fakes.mcp_server

Tools: `add` (a result), `shout` (text back), `fail` (an error result) and
`slow` (sleeps, for timeouts and cancellation; it writes a marker file when
it is cancelled, if VA_MCP_MARKER names one).
"""

from __future__ import annotations

import asyncio
import os

from mcp.server.mcpserver import MCPServer

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


if __name__ == "__main__":
    server.run("stdio")
