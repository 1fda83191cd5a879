"""MCP tools from the configured MCP servers (the `mcp` package).

Where MCP server connections live: in one shared `MCPHub` Ray actor per
cluster and configuration, not in each session. A stdio server is a process
(a Python one ~50-100 MB and ~1 s to start) and an HTTP server a handshake
plus a server-side session; per session that would blow the density budget
(DESIGN §2: ~49 MB per idle session) and add seconds to the first turn. The
servers in config are global (no per-user credentials), so sharing them is
right, and one actor call costs ~1 ms against tool calls of tens of ms or
more. Outside Ray (benchmarks, tests of the core) a process-wide
`MCPManager` does the same job in-process.

The xiaozhi device's own tools (JSON-RPC over the device's socket) are the
opposite: they belong to the one device on a session's socket, so they live
in the session (actors/agent/device_tools.py) and share only the limits and
the name, schema and result helpers here.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
from typing import Any

from actors.agent.tools import TOOL_NAME_RE, MCPServerConfig, ToolContext, ToolError, ToolsConfig
from actors.providers.base import ToolSpec

log = logging.getLogger(__name__)

MAX_DESCRIPTION_CHARS = 1024
MAX_SCHEMA_CHARS = 4096
MAX_LIST_PAGES = 10
MAX_CURSOR_CHARS = 256
MAX_TEXT_CHARS = 8000
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


# ------------------------------------------------------------ shared helpers
def llm_name(prefix: str, name: str, taken: set[str]) -> str | None:
    """`<prefix><name>` within OpenAI's rules (64 of [A-Za-z0-9_-]): other
    characters become `_`, and a clash gets a number; None if hopeless."""
    base = (prefix + _UNSAFE.sub("_", name).strip("_"))[:64]
    if base == prefix:
        return None
    candidate, n = base, 1
    while candidate in taken:
        n += 1
        suffix = f"_{n}"
        candidate = base[:64 - len(suffix)] + suffix
        if n > 99:
            return None
    return candidate if TOOL_NAME_RE.match(candidate) else None


def clean_schema(schema: Any) -> dict[str, Any]:
    """An MCP `inputSchema` as an OpenAI function's parameters: an object
    schema of bounded size (it goes into every LLM request), `properties`
    a dict and `required` a list of strings; anything else becomes 'no
    arguments' rather than a request the LLM vendor refuses."""
    empty: dict[str, Any] = {"type": "object", "properties": {}}
    if not isinstance(schema, dict) or schema.get("type", "object") != "object":
        return empty
    try:
        if len(json.dumps(schema)) > MAX_SCHEMA_CHARS:
            return empty
    except (TypeError, ValueError):
        return empty
    props = schema.get("properties", {})
    required = schema.get("required", [])
    out = dict(schema, type="object", properties=props if isinstance(props, dict) else {})
    out["required"] = [r for r in required if isinstance(r, str)] if isinstance(required, list) else []
    return out


def tool_spec(prefixed: str, tool: dict[str, Any]) -> ToolSpec:
    description = tool.get("description")
    return ToolSpec(name=prefixed,
                    description=description[:MAX_DESCRIPTION_CHARS] if isinstance(description, str) else "",
                    parameters=clean_schema(tool.get("inputSchema")))


def result_text(result: Any) -> str:
    """An MCP `tools/call` result → the tool-result string: its text content
    joined (other content kinds are named, not inlined); `isError` raises."""
    if not isinstance(result, dict):
        raise ToolError("the tool returned no result")
    parts: list[str] = []
    content = result.get("content")
    for item in content[:50] if isinstance(content, list) else []:
        if isinstance(item, dict) and item.get("type") == "text" and isinstance(item.get("text"), str):
            parts.append(item["text"])
        elif isinstance(item, dict) and isinstance(item.get("type"), str):
            parts.append(f"[{item['type'][:20]} content]")
    if not parts and result.get("structuredContent") is not None:
        with contextlib.suppress(TypeError, ValueError):
            parts.append(json.dumps(result["structuredContent"], ensure_ascii=False))
    text = "\n".join(parts)[:MAX_TEXT_CHARS]
    if result.get("isError") is True:
        raise ToolError(text[:500] or "the tool failed")
    return text


# ------------------------------------------------------- configured servers
class _Server:
    """One MCP server connection, held open by its own task (the `mcp`
    transports are anyio context managers: entered and left in one task)."""

    def __init__(self, cfg: MCPServerConfig) -> None:
        self.cfg = cfg
        self.session: Any = None
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    async def ensure(self) -> Any:
        if self.session is not None and self._task is not None and not self._task.done():
            return self.session
        ready: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._stop = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(ready), name=f"mcp:{self.cfg.name}")
        try:
            async with asyncio.timeout(self.cfg.timeout_s):
                return await asyncio.shield(ready)
        except BaseException:
            self._task.cancel()
            raise

    async def _run(self, ready: asyncio.Future[Any]) -> None:
        from mcp import ClientSession, StdioServerParameters, stdio_client

        cfg = self.cfg
        try:
            async with contextlib.AsyncExitStack() as stack:
                if cfg.transport == "stdio":
                    assert cfg.command
                    params = StdioServerParameters(command=cfg.command, args=cfg.args, env=cfg.env or None,
                                                   cwd=cfg.cwd)
                    read, write = await stack.enter_async_context(stdio_client(params))
                else:
                    import httpx2
                    from mcp.client.streamable_http import streamable_http_client
                    from mcp.shared._httpx_utils import create_mcp_http_client

                    assert cfg.url
                    http = create_mcp_http_client(headers=cfg.headers or None,
                                                  timeout=httpx2.Timeout(cfg.timeout_s, read=300.0))
                    await stack.enter_async_context(http)
                    read, write = await stack.enter_async_context(streamable_http_client(cfg.url, http_client=http))
                session = await stack.enter_async_context(ClientSession(read, write))
                await session.initialize()
                self.session = session
                if not ready.done():
                    ready.set_result(session)
                await self._stop.wait()
        except BaseException as e:
            if not ready.done():
                ready.set_exception(e if isinstance(e, Exception) else ConnectionError("cancelled"))
            if not isinstance(e, (Exception, asyncio.CancelledError)):
                raise
            if isinstance(e, Exception):
                log.warning("MCP server %s: %r", cfg.name, e)
        finally:
            self.session = None

    async def list_tools(self) -> list[dict[str, Any]]:
        from mcp.types import PaginatedRequestParams

        session = await self.ensure()
        tools: list[dict[str, Any]] = []
        cursor: str | None = None
        async with asyncio.timeout(self.cfg.timeout_s):
            for _ in range(MAX_LIST_PAGES):
                page = await session.list_tools(params=PaginatedRequestParams(cursor=cursor) if cursor else None)
                tools += [t.model_dump(by_alias=True, exclude_none=True) for t in page.tools]
                cursor = page.next_cursor
                if not cursor or len(tools) >= self.cfg.max_tools * 4:
                    break
        return tools

    async def call(self, tool: str, arguments: dict[str, Any], timeout_s: float) -> str:
        session = await self.ensure()
        async with asyncio.timeout(timeout_s):
            result = await session.call_tool(tool, arguments)
        return result_text(result.model_dump(by_alias=True, exclude_none=True))

    async def close(self) -> None:
        self._stop.set()
        if self._task is not None:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(self._task, 5.0)


class MCPManager:
    """The configured MCP servers: connected lazily (each within its
    `timeout_s`), their tools listed page by page and named
    `<server>__<tool>` for the LLM, calls routed back. A server that fails
    is left out of the listing (logged); the others still serve."""

    def __init__(self, servers: list[MCPServerConfig]) -> None:
        self._servers = {s.name: _Server(s) for s in servers}
        self._routes: dict[str, tuple[str, str]] = {}
        self._specs: list[ToolSpec] | None = None
        self._lock = asyncio.Lock()

    async def specs(self) -> list[ToolSpec]:
        async with self._lock:
            if self._specs is None:
                listings = await asyncio.gather(*(s.list_tools() for s in self._servers.values()),
                                                return_exceptions=True)
                specs: list[ToolSpec] = []
                taken: set[str] = set()
                failed = False
                for server, listing in zip(self._servers.values(), listings):
                    if isinstance(listing, BaseException):
                        log.warning("MCP server %s: tools not listed: %r", server.cfg.name, listing)
                        failed = True
                        continue
                    allowed = server.cfg.allowed_tools
                    count = 0
                    for tool in listing:
                        name = tool.get("name")
                        if not isinstance(name, str) or (allowed is not None and name not in allowed):
                            continue
                        prefixed = llm_name(f"{server.cfg.name}__", name, taken)
                        if prefixed is None or count >= server.cfg.max_tools:
                            continue
                        taken.add(prefixed)
                        count += 1
                        self._routes[prefixed] = (server.cfg.name, name)
                        specs.append(tool_spec(prefixed, tool))
                if not failed:  # a server that was down is listed again next time
                    self._specs = specs
                return specs
            return list(self._specs)

    async def register_into(self, registry: Any, timeout_s: float = 10.0) -> list[str]:
        """Put every listed tool into a `ToolRegistry` (shared or a session's)."""
        names = []
        for spec in await self.specs():
            async def fn(args: dict[str, Any], ctx: ToolContext, _name: str = spec.name) -> str:
                return await self.call(_name, args, timeout_s)
            registry.register(spec, fn)
            names.append(spec.name)
        return names

    async def call(self, name: str, arguments: dict[str, Any], timeout_s: float) -> str:
        route = self._routes.get(name)
        if route is None:
            raise ToolError(f"unknown MCP tool '{name[:64]}'")
        server, tool = route
        try:
            return await self._servers[server].call(tool, arguments, timeout_s)
        except ToolError:
            raise
        except TimeoutError:
            raise ToolError(f"the {server} tool did not answer within {timeout_s:g} s") from None
        except Exception as e:  # the MCP SDK's own errors (McpError, a dead process)
            raise ToolError(f"the {server} tool failed: {str(e)[:200] or type(e).__name__}") from None

    async def aclose(self) -> None:
        await asyncio.gather(*(s.close() for s in self._servers.values()))


# ------------------------------------------------------------ the shared hub
def hub_name(servers: list[MCPServerConfig]) -> str:
    """One hub per configuration: a changed server list gets a fresh hub."""
    digest = hashlib.sha1(json.dumps([s.model_dump() for s in servers], sort_keys=True).encode()).hexdigest()
    return f"mcp:hub:{digest[:12]}"


def _hub_class() -> Any:
    import ray

    @ray.remote(num_cpus=0, max_restarts=-1)
    class MCPHub:
        """Holds the MCP server connections for every session (module docstring)."""

        def __init__(self, servers: list[dict[str, Any]]) -> None:
            self._manager = MCPManager([MCPServerConfig.model_validate(s) for s in servers])

        async def specs(self) -> list[ToolSpec]:
            return await self._manager.specs()

        async def call(self, name: str, arguments: dict[str, Any], timeout_s: float) -> tuple[bool, str]:
            """→ (ok, text): a ToolError is an answer, not an actor failure."""
            try:
                return True, await self._manager.call(name, arguments, timeout_s)
            except ToolError as e:
                return False, str(e)

    return MCPHub


class HubSource:
    """A session's handle on the shared hub (a `ToolSource`)."""

    def __init__(self, servers: list[MCPServerConfig], namespace: str | None = None) -> None:
        self._servers = servers
        self._namespace = namespace
        self._hub: Any = None

    def _actor(self) -> Any:
        if self._hub is None:
            self._hub = _hub_class().options(
                name=hub_name(self._servers), namespace=self._namespace, lifetime="detached",
                get_if_exists=True, max_concurrency=1000,
            ).remote([s.model_dump() for s in self._servers])
        return self._hub

    async def specs(self) -> list[ToolSpec]:
        return await self._actor().specs.remote()

    async def call(self, name: str, arguments: dict[str, Any], timeout_s: float) -> str:
        import ray

        ref = self._actor().call.remote(name, arguments, timeout_s)
        try:
            ok, text = await ref
        except asyncio.CancelledError:
            ray.cancel(ref)  # the interrupted turn's call stops at the hub too
            raise
        if not ok:
            raise ToolError(text)
        return text


class LocalSource:
    """The in-process alternative: one `MCPManager` per process and config."""

    _managers: dict[str, MCPManager] = {}

    def __init__(self, servers: list[MCPServerConfig]) -> None:
        key = hub_name(servers)
        self._manager = self._managers.get(key) or self._managers.setdefault(key, MCPManager(servers))

    async def specs(self) -> list[ToolSpec]:
        return await self._manager.specs()

    async def call(self, name: str, arguments: dict[str, Any], timeout_s: float) -> str:
        return await self._manager.call(name, arguments, timeout_s)


def mcp_source(config: ToolsConfig, namespace: str | None = None) -> HubSource | LocalSource | None:
    """Where this process reaches the configured MCP servers, if any."""
    if not config.mcp_servers:
        return None
    try:
        import ray

        if ray.is_initialized():
            return HubSource(config.mcp_servers, namespace)
    except ImportError:
        pass
    return LocalSource(config.mcp_servers)
