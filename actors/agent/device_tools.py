"""The xiaozhi device's MCP tools, for the one session whose socket it is on.

A device lists its tools and answers their calls over its own socket
(JSON-RPC inside xiaozhi `mcp` messages), so these are neither shared nor
pooled like the configured MCP servers (actors/agent/mcp.py): they are
registered in that session's `SessionTools` only, and every size the device
sends is bounded with mcp.py's limits.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable
from typing import Any

from actors.agent.mcp import MAX_CURSOR_CHARS, MAX_LIST_PAGES, llm_name, result_text, tool_spec
from actors.agent.tools import SessionTools, ToolContext, ToolError

log = logging.getLogger(__name__)

MAX_PENDING_CALLS = 8
DEVICE_PREFIX = "device__"


class DeviceTools:
    """The xiaozhi device's MCP tools, for this session only.

    The protocol adapter opens with `initialize` (id 1) and `tools/list`
    (id 2) right after the hello; this follows `nextCursor` with further
    `tools/list` requests of its own (ids from 1000, never clashing), then
    offers the listed tools to the LLM as `device__<name>`. A call sends
    `tools/call` down the socket (through `send`, which the session turns
    into a `device.request` event) and awaits the response of the same id.
    Everything the device sends is bounded: tool count, name, description
    and schema sizes, pages, pending calls."""

    INITIALIZE_ID = 1
    FIRST_LIST_ID = 2

    def __init__(self, tools: SessionTools, send: Callable[[dict[str, Any]], None], *,
                 timeout_s: float = 10.0, max_tools: int = 64) -> None:
        self._tools = tools
        self._send = send
        self._timeout_s = timeout_s
        self._max_tools = max_tools
        self._ids = itertools.count(1000)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._listing: dict[int, int] = {}
        """Our tools/list request id → its page number."""
        self._staged: list[dict[str, Any]] = []
        self._names: dict[str, str] = {}
        """LLM name → the device's tool name."""
        self.server_info: dict[str, Any] = {}

    @property
    def names(self) -> list[str]:
        return list(self._names)

    def on_message(self, payload: Any) -> None:
        """A JSON-RPC message from the device (its `mcp` payload)."""
        if not isinstance(payload, dict):
            return
        rid = payload.get("id")
        if "method" in payload or not isinstance(rid, int) or isinstance(rid, bool):
            return  # notifications and requests from the device: nothing to answer yet
        result, error = payload.get("result"), payload.get("error")
        if rid in self._pending:
            fut = self._pending[rid]
            if not fut.done():
                fut.set_result(payload)
        elif rid == self.INITIALIZE_ID:
            self._on_initialize(result, error)
        elif rid == self.FIRST_LIST_ID:
            self._staged = []
            self._on_tools_page(1, result, error)
        elif rid in self._listing:
            self._on_tools_page(self._listing.pop(rid), result, error)

    def _on_initialize(self, result: Any, error: Any) -> None:
        if not isinstance(result, dict):
            log.info("device refused MCP initialize: %.200r", error)
            return
        info = result.get("serverInfo")
        self.server_info = {k: str(v)[:100] for k, v in (info.items() if isinstance(info, dict) else [])
                            if k in ("name", "version")}
        if isinstance(result.get("protocolVersion"), str):
            self.server_info["protocolVersion"] = result["protocolVersion"][:40]
        self._send({"jsonrpc": "2.0", "method": "notifications/initialized"})

    def _on_tools_page(self, page: int, result: Any, error: Any) -> None:
        if not isinstance(result, dict):
            log.info("device tools/list failed: %.200r", error)
            self._commit()
            return
        tools = result.get("tools")
        for tool in tools if isinstance(tools, list) else []:
            if len(self._staged) >= self._max_tools:
                break
            if isinstance(tool, dict) and isinstance(tool.get("name"), str) and len(tool["name"]) <= 128:
                self._staged.append(tool)
        cursor = result.get("nextCursor")
        if (isinstance(cursor, str) and cursor and len(cursor) <= MAX_CURSOR_CHARS and page < MAX_LIST_PAGES
                and len(self._staged) < self._max_tools):
            rid = next(self._ids)
            self._listing = {rid: page + 1}  # only the newest listing continues
            self._send({"jsonrpc": "2.0", "id": rid, "method": "tools/list", "params": {"cursor": cursor}})
            return
        self._commit()

    def _commit(self) -> None:
        """Offer the complete listing, replacing the previous one."""
        taken: set[str] = set()
        names: dict[str, str] = {}
        entries = []
        for tool in self._staged:
            prefixed = llm_name(DEVICE_PREFIX, tool["name"], taken)
            if prefixed is None:
                continue
            taken.add(prefixed)
            names[prefixed] = tool["name"]

            async def fn(args: dict[str, Any], ctx: ToolContext, _name: str = tool["name"]) -> str:
                return await self.call(_name, args)
            entries.append((tool_spec(prefixed, tool), fn))
        self._names = names
        self._staged = []
        self._tools.replace(DEVICE_PREFIX, entries)
        log.info("device offers %d MCP tools", len(entries))

    async def call(self, name: str, arguments: dict[str, Any]) -> str:
        """`tools/call` on the device; its answer (or error) as the result."""
        if len(self._pending) >= MAX_PENDING_CALLS:
            raise ToolError("the device is busy with other calls")
        rid = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            self._send({"jsonrpc": "2.0", "id": rid, "method": "tools/call",
                        "params": {"name": name, "arguments": arguments}})
            try:
                async with asyncio.timeout(self._timeout_s):
                    reply = await fut
            except ToolError:
                raise
            except TimeoutError:
                raise ToolError(f"the device did not answer within {self._timeout_s:g} s") from None
            except asyncio.CancelledError:
                self._send({"jsonrpc": "2.0", "method": "notifications/cancelled",
                            "params": {"requestId": rid, "reason": "the turn was interrupted"}})
                raise
        finally:
            self._pending.pop(rid, None)
        error = reply.get("error")
        if error is not None:
            message = error.get("message") if isinstance(error, dict) else None
            raise ToolError(f"the device refused: {message[:200] if isinstance(message, str) else 'error'}")
        return result_text(reply.get("result"))

    def cancel_all(self) -> None:
        """The session ends: waiting calls fail now instead of at their timeout."""
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(ToolError("the session ended"))
