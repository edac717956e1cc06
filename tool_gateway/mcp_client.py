"""Connections to MCP servers (the official `mcp` SDK), one per server the
tools file declares:

    mcp_servers:
      - name: time                      # names the server in errors and logs
        command: mcp-server-time        # stdio: a command, its args and env
        args: ["--local-timezone", "UTC"]
        env: {TZ: UTC}
        timeout_seconds: 30             # per call (default 60)
        prefix: ""                      # put before each tool name (default none)
      - name: docs
        url: http://docs-mcp:8000/mcp   # streamable HTTP, with headers
        headers: {Authorization: "Bearer ${DOCS_TOKEN}"}
        tools:                          # per-tool overrides (optional)
          search_docs: {partial_safe: true}

The SDK's client must be entered and left in one task, so each connection
has an owner task that holds it open; calls from any task go through it. A
server that dies fails the calls in flight with a clear error; the next call
starts (or reconnects to) it again.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog

log = structlog.get_logger("mcp")

DEFAULT_TIMEOUT_S = 60.0
# How long a server may take to start and answer its first request.
CONNECT_TIMEOUT_S = 30.0
_ENV_REFERENCE = re.compile(r"\$\{(\w+)\}")


class McpError(Exception):
    """An MCP server could not be reached, or failed a call; says which."""


class McpTimeout(McpError):
    pass


@dataclass(frozen=True)
class McpServerConfig:
    name: str
    command: str = ""
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    url: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    timeout_seconds: float = DEFAULT_TIMEOUT_S
    prefix: str = ""
    tools: dict[str, dict] = field(default_factory=dict)  # per-tool overrides

    def __post_init__(self) -> None:
        if bool(self.command) == bool(self.url):
            raise ValueError(f"MCP server {self.name!r}: give exactly one of 'command' or 'url'")
        if not self.timeout_seconds > 0:
            raise ValueError(f"MCP server {self.name!r}: timeout_seconds must be positive")

    @property
    def where(self) -> str:
        return self.url or " ".join([self.command, *self.args])


def expand(value: str) -> str:
    """`${NAME}` from the gateway's environment (so secrets stay out of the file)."""
    return _ENV_REFERENCE.sub(lambda m: os.environ.get(m.group(1), ""), value)


@dataclass(frozen=True)
class McpToolInfo:
    name: str
    description: str
    input_schema: dict


@dataclass(frozen=True)
class McpResult:
    ok: bool
    text: str  # the content's text parts, or the structured content as JSON


Progress = Callable[[float, float | None, str | None], Awaitable[None]]


class McpConnection:
    """One MCP server: started (stdio) or connected (HTTP) on first use and
    again after it fails."""

    def __init__(self, config: McpServerConfig):
        self.config = config
        self._client = None
        self._owner: asyncio.Task | None = None
        self._ready: asyncio.Future | None = None
        self._stop = asyncio.Event()
        self._lock = asyncio.Lock()

    async def _connected(self):
        async with self._lock:
            if self._owner is None or self._owner.done():
                self._stop = asyncio.Event()
                self._ready = asyncio.get_running_loop().create_future()
                self._owner = asyncio.create_task(self._own(), name=f"mcp {self.config.name}")
            ready = self._ready
        try:
            return await asyncio.wait_for(asyncio.shield(ready), CONNECT_TIMEOUT_S)
        except TimeoutError:
            await self._drop()
            raise McpError(
                f"MCP server {self.config.name!r} ({self.config.where}) did not answer within "
                f"{CONNECT_TIMEOUT_S:g} s"
            ) from None

    async def _own(self) -> None:
        """Holds the SDK client open until stopped (the SDK's task groups must
        be entered and left in one task)."""
        from mcp import Client

        try:
            async with self._transport() as transport:
                async with Client(transport, mode="legacy") as client:
                    self._ready.set_result(client)
                    await self._stop.wait()
        except BaseException as e:  # noqa: BLE001 (the SDK raises exception groups)
            if not self._ready.done():
                self._ready.set_exception(
                    McpError(
                        f"MCP server {self.config.name!r} ({self.config.where}) could not be "
                        f"started: {_reason(e)}"
                    )
                )
            if isinstance(e, asyncio.CancelledError):
                raise

    def _transport(self):
        from contextlib import asynccontextmanager

        config = self.config

        @asynccontextmanager
        async def transport():
            if config.command:
                from mcp import StdioServerParameters

                params = StdioServerParameters(
                    command=config.command,
                    args=list(config.args),
                    env={k: expand(v) for k, v in config.env.items()} or None,
                )
                yield params
                return
            import httpx2
            from mcp.client.streamable_http import streamable_http_client

            headers = {k: expand(v) for k, v in config.headers.items()}
            timeout = httpx2.Timeout(CONNECT_TIMEOUT_S, read=config.timeout_seconds + 5)
            async with httpx2.AsyncClient(headers=headers, timeout=timeout) as http:
                yield streamable_http_client(config.url, http_client=http)

        return transport()

    async def _drop(self) -> None:
        """Stops the connection; the next call makes a new one."""
        owner, self._owner = self._owner, None
        if owner is not None and not owner.done():
            self._stop.set()
            try:
                await asyncio.wait_for(asyncio.shield(owner), 10)
            except BaseException:  # noqa: BLE001 (a dead server's exit raises groups)
                owner.cancel()

    async def list_tools(self) -> list[McpToolInfo]:
        client = await self._connected()
        try:
            listed = await asyncio.wait_for(client.list_tools(), self.config.timeout_seconds)
        except BaseException as e:  # noqa: BLE001
            await self._after_failure(e)
            raise McpError(
                f"MCP server {self.config.name!r}: listing its tools failed: {_reason(e)}"
            ) from None
        return [
            McpToolInfo(t.name, t.description or "", dict(t.input_schema or {}))
            for t in listed.tools
        ]

    async def call(self, tool: str, arguments: dict, on_progress: Progress | None) -> McpResult:
        """Calls `tool`; raises McpTimeout past the server's timeout and
        McpError when the server fails or dies (it is restarted for the next
        call). Cancelling the awaiting task cancels the call on the server
        (the SDK sends notifications/cancelled)."""
        from mcp import MCPError

        client = await self._connected()
        try:
            result = await client.call_tool(
                tool,
                arguments,
                read_timeout_seconds=self.config.timeout_seconds,
                progress_callback=on_progress,
            )
        except MCPError as e:
            if e.code == -32001:  # REQUEST_TIMEOUT
                raise McpTimeout(
                    f"MCP server {self.config.name!r}: {tool} ran past its "
                    f"{self.config.timeout_seconds:g} s timeout and was cancelled"
                ) from None
            if e.code == -32000:  # CONNECTION_CLOSED: the server died
                await self._after_failure(e)
                raise McpError(
                    f"MCP server {self.config.name!r} closed the connection during {tool}: "
                    f"{e.message}; it is restarted for the next call"
                ) from None
            raise McpError(f"MCP server {self.config.name!r}: {tool}: {e.message}") from None
        except asyncio.CancelledError:
            if self._owner is not None and self._owner.done():
                raise McpError(f"MCP server {self.config.name!r} went away during {tool}") from None
            raise
        except Exception as e:
            await self._after_failure(e)
            raise McpError(f"MCP server {self.config.name!r}: {tool}: {_reason(e)}") from None
        return McpResult(not result.is_error, _text_of(result))

    async def _after_failure(self, error: BaseException) -> None:
        log.warning("mcp server failed", server=self.config.name, error=_reason(error))
        await self._drop()

    async def close(self) -> None:
        await self._drop()


def _text_of(result) -> str:
    texts = [c.text for c in result.content if getattr(c, "type", "") == "text"]
    if texts:
        return "\n".join(texts)
    if result.structured_content is not None:
        import json

        return json.dumps(result.structured_content, ensure_ascii=False)
    kinds = ", ".join(sorted({getattr(c, "type", "?") for c in result.content}))
    return f"({kinds} content)" if kinds else ""


def _reason(error: BaseException) -> str:
    """The innermost message of an SDK error (they come in exception groups)."""
    while getattr(error, "exceptions", None):  # an exception group
        error = error.exceptions[0]
    message = getattr(error, "message", None) or str(error) or type(error).__name__
    return f"{type(error).__name__}: {message}" if type(error).__name__ not in message else message
