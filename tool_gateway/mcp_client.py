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

    def check_environment(self) -> None:
        """Fails now, naming it, if a ${VAR} the server needs is unset."""
        for value in [*self.env.values(), *self.headers.values()]:
            expand(value)


def expand(value: str) -> str:
    """`${NAME}` from the gateway's environment (so secrets stay out of the
    file); an unset NAME is an error that names it."""

    def value_of(match: re.Match) -> str:
        name = match.group(1)
        if name not in os.environ:
            raise McpError(f"${{{name}}} is not set in the gateway's environment")
        return os.environ[name]

    return _ENV_REFERENCE.sub(value_of, value)


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


@dataclass
class _Link:
    """One connection's life: its owner task, the client once connected,
    and the event that ends it. A new link replaces a failed one, and a late
    failure of the old one never touches the new."""

    ready: asyncio.Future
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    owner: asyncio.Task | None = None


class McpConnection:
    """One MCP server: started (stdio) or connected (HTTP) on first use and
    again after it fails."""

    def __init__(self, config: McpServerConfig):
        self.config = config
        self._link: _Link | None = None
        self._lock = asyncio.Lock()

    async def _connected(self) -> tuple[object, _Link]:
        async with self._lock:
            link = self._link
            if link is None or link.owner.done():
                link = _Link(asyncio.get_running_loop().create_future())
                link.owner = asyncio.create_task(self._own(link), name=f"mcp {self.config.name}")
                self._link = link
        try:
            return await asyncio.wait_for(asyncio.shield(link.ready), CONNECT_TIMEOUT_S), link
        except TimeoutError:
            await self._drop(link)
            raise McpError(
                f"MCP server {self.config.name!r} did not answer within {CONNECT_TIMEOUT_S:g} s"
            ) from None

    async def _own(self, link: _Link) -> None:
        """Holds the SDK client open until stopped (the SDK's task groups must
        be entered and left in one task)."""
        from mcp import Client

        try:
            async with self._transport() as transport:
                async with Client(transport, mode="legacy") as client:
                    link.ready.set_result(client)
                    await link.stop.wait()
        except BaseException as e:  # noqa: BLE001 (the SDK raises exception groups)
            if not link.ready.done():
                link.ready.set_exception(
                    McpError(f"MCP server {self.config.name!r} could not be started: {_reason(e)}")
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

    async def _drop(self, link: _Link) -> None:
        """Ends `link`; the next call makes a new one. A no-op for a link
        already replaced."""
        if self._link is link:
            self._link = None
        if link.owner is None or link.owner.done():
            return
        link.stop.set()
        try:
            await asyncio.wait_for(asyncio.shield(link.owner), 10)
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():
                link.owner.cancel()
                raise  # our own caller was cancelled: say so
        except BaseException:  # noqa: BLE001 (a dead server's exit raises groups)
            link.owner.cancel()

    async def list_tools(self) -> list[McpToolInfo]:
        client, link = await self._connected()
        try:
            listed = await asyncio.wait_for(client.list_tools(), self.config.timeout_seconds)
        except Exception as e:
            await self._failed(link, e)
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
        call). A session the server no longer knows (it restarted, or let
        the session expire) is reconnected and the call sent once more: the
        server refused it unrun. Cancelling the awaiting task cancels the
        call on the server (the SDK sends notifications/cancelled)."""
        for attempt in (1, 2):
            client, link = await self._connected()
            if _closed(client):  # the server died while idle: nothing was sent yet
                await self._failed(link, McpError("the connection had closed"))
                client, link = await self._connected()
            try:
                result = await client.call_tool(
                    tool,
                    arguments,
                    read_timeout_seconds=self.config.timeout_seconds,
                    progress_callback=on_progress,
                )
            except Exception as e:
                if _session_gone(e) and attempt == 1:
                    await self._failed(link, e)
                    continue
                raise await self._call_error(link, tool, e) from None
            return McpResult(not result.is_error, _text_of(result))
        raise AssertionError("unreachable")

    async def _call_error(self, link: _Link, tool: str, e: Exception) -> McpError:
        from mcp import MCPError

        name = self.config.name
        if isinstance(e, MCPError) and e.code == -32001:  # REQUEST_TIMEOUT
            return McpTimeout(
                f"MCP server {name!r}: {tool} ran past its {self.config.timeout_seconds:g} s "
                "timeout and was cancelled"
            )
        if _connection_failed(e):
            await self._failed(link, e)
            return McpError(
                f"MCP server {name!r} closed the connection during {tool}: {_reason(e)}; it is "
                "restarted for the next call"
            )
        # The server answered with an error, or the SDK refused its answer:
        # the connection is fine, and so are the other calls on it.
        return McpError(f"MCP server {name!r}: {tool}: {_reason(e)}")

    async def _failed(self, link: _Link, error: BaseException) -> None:
        log.warning("mcp server failed", server=self.config.name, error=_reason(error))
        await self._drop(link)

    async def close(self) -> None:
        if self._link is not None:
            await self._drop(self._link)


def _connection_failed(error: BaseException) -> bool:
    """The connection, not the call, failed (the server died or went away)."""
    from mcp import MCPError

    if isinstance(error, MCPError):
        return error.code == -32000 or _session_gone(error)  # CONNECTION_CLOSED
    return (
        isinstance(error, OSError | EOFError)
        or bool(getattr(error, "exceptions", None))
        or (type(error).__module__.startswith(("httpx", "anyio")))
    )


def _closed(client) -> bool:
    """Whether the SDK client's connection has already closed (its server
    died while idle). Reads the SDK's private state (mcp 2.3); where that
    is missing, False: the call then fails and the next one reconnects."""
    dispatcher = getattr(getattr(client, "_session", None), "_dispatcher", None)
    return bool(getattr(dispatcher, "_closed", False))


def _session_gone(error: BaseException) -> bool:
    """The HTTP server no longer knows the session (a 404 on it)."""
    from mcp import MCPError

    return isinstance(error, MCPError) and "session terminated" in str(error.message).lower()


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
