"""The gateway's own tools over MCP (streamable HTTP, `--mcp-port`): python
(sandboxed), search, database, calculator and every other hosted tool, for
any MCP client.

A tools/call runs exactly as a call on the Execute stream does: its
arguments are cut into the tool's command units by the same parsers the
scheduler uses (scheduler/parsers, pure code), and the units go through a
StreamExecutor, so every limit, timeout, sandbox and metric is the same.
Calls of one MCP session share one executor, and so the python tool's
interpreter: variables persist across the session's calls. An idle session
is closed (its interpreters killed) after --mcp-session-idle seconds; a
client on MCP's stateless protocol gets a fresh session per call.

The port takes the gateway's --auth-token-file tokens (`Authorization:
Bearer`) and serves TLS with its --tls-cert (and, with --tls-ca, asks for
a client certificate signed by it). Peer names (--tls-allowed-names) cannot
be read on this port, so with them set it needs tokens too.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import time
import uuid

import jsonschema
import structlog

from conveyor_common.security import (
    AUTHORIZATION_KEY,
    SecurityConfigError,
    ServerSecurity,
    authorization_metadata,
    refuse,
)
from scheduler.parsers import ParseFailure, arguments_parser_for, check_unit
from tool_gateway.executor import StreamExecutor
from tool_gateway.messages import (
    CallFailed,
    CallFinished,
    CancelCall,
    CloseCall,
    OpenCall,
    RunUnit,
    UnitProgress,
)
from tool_gateway.registry import ToolRegistry
from tool_gateway.tools.base import Unit

log = structlog.get_logger("mcp_server")

MCP_PATH = "/mcp"
DEFAULT_SESSION_IDLE_S = 600.0


class _Session:
    """One MCP session's executor, and the calls waiting on its events."""

    def __init__(self, registry: ToolRegistry, call_timeout: float, key: str):
        self.key = key
        # For logs: the session id is a credential of sorts, so only a digest.
        self.label = hashlib.sha256(key.encode()).hexdigest()[:12]
        self.executor = StreamExecutor(registry, call_timeout)
        self.waiting: dict[str, tuple[asyncio.Future, object]] = {}
        self.used = time.monotonic()
        self._reader = asyncio.create_task(self._read(), name=f"mcp session {key}")

    async def _read(self) -> None:
        try:
            while (event := await self.executor.next_event()) is not None:
                entry = self.waiting.get(event.call_id)
                if entry is None:
                    continue
                done, on_progress = entry
                if isinstance(event, UnitProgress):
                    # Progress is best effort: a client that cannot take it
                    # must not hold up the session's results.
                    task = asyncio.create_task(on_progress(event))
                    task.add_done_callback(_quiet)
                elif isinstance(event, CallFinished | CallFailed) and not done.done():
                    done.set_result(event)
        finally:  # the executor is done: nobody waits forever
            for done, _ in self.waiting.values():
                if not done.done():
                    done.set_exception(RuntimeError("the MCP session's tools shut down"))

    async def close(self) -> None:
        await self.executor.shutdown()
        self._reader.cancel()


def _quiet(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.debug("mcp progress not delivered", error=str(task.exception()))


# MCP sessions alive at once (each may hold interpreters until it is idle).
MAX_SESSIONS = 64


class GatewayMcpServer:
    def __init__(
        self,
        registry: ToolRegistry,
        call_timeout: float,
        security: ServerSecurity,
        session_idle: float = DEFAULT_SESSION_IDLE_S,
    ):
        if not session_idle > 0:
            raise ValueError(f"--mcp-session-idle must be positive, not {session_idle}")
        if security.allowed_names and security.tokens is None:
            raise SecurityConfigError(
                "--mcp-port with --tls-allowed-names needs --auth-token-file: the MCP port "
                "cannot check peer names, so it would admit any certificate the CA signed"
            )
        self._registry = registry
        self._call_timeout = call_timeout
        self._security = security
        self._session_idle = session_idle
        self._sessions: dict[str, _Session] = {}
        self._ids = itertools.count()
        self._uvicorn = None
        self._serving: asyncio.Task | None = None
        self._reaper: asyncio.Task | None = None

    # ---- MCP handlers ---------------------------------------------------

    def _server(self):
        import mcp_types as types
        from mcp.server import Server

        async def list_tools(ctx, params) -> types.ListToolsResult:
            return types.ListToolsResult(
                tools=[
                    types.Tool(
                        name=spec.name,
                        description=spec.description,
                        input_schema=spec.parameters or {"type": "object", "properties": {}},
                    )
                    for spec in self._registry.specs()
                ]
            )

        async def call_tool(ctx, params) -> types.CallToolResult:
            ok, text = await self._call(ctx, params.name, params.arguments or {})
            return types.CallToolResult(
                content=[types.TextContent(type="text", text=text)], is_error=not ok
            )

        return Server(
            "conveyor-tool-gateway",
            version="0.1.0",
            on_list_tools=list_tools,
            on_call_tool=call_tool,
        )

    async def _call(self, ctx, name: str, arguments: dict) -> tuple[bool, str]:
        tool = self._registry.get(name)
        if tool is None:
            return (
                False,
                f"unknown tool {name!r}; this gateway has: {', '.join(self._registry.names())}",
            )
        spec = tool.spec
        try:
            jsonschema.validate(arguments, spec.parameters or {"type": "object"})
        except jsonschema.ValidationError as e:
            return False, f"invalid arguments: {e.message}"
        except jsonschema.SchemaError:
            return False, f"the tool {name!r} has an invalid input schema"
        full_text = json.dumps(arguments, ensure_ascii=False)
        parser = arguments_parser_for(spec.partial_mode, spec.command_field)
        try:
            units = parser.feed(full_text) + parser.finish()
            for unit in units:
                check_unit(spec.partial_mode, unit.text)
        except ParseFailure as e:
            return False, f"invalid arguments: {e}"
        session_id = _session_id(ctx)
        if session_id is not None and session_id not in self._sessions:
            if len(self._sessions) >= MAX_SESSIONS:
                return False, f"the gateway holds {MAX_SESSIONS} MCP sessions; try again later"
        session = self._session(session_id)
        call_id = f"mcp-{next(self._ids)}"
        done = asyncio.get_running_loop().create_future()

        async def on_progress(event: UnitProgress) -> None:
            # A unit's output so far, as MCP progress (a no-op unless the
            # client asked for progress).
            await ctx.session.report_progress(event.index + 1, len(units), event.stdout[-1000:])

        session.waiting[call_id] = (done, on_progress)
        executor = session.executor
        executor.submit(
            OpenCall(call_id, name, run_id=f"mcp:{session.label}", session_key=session.key)
        )
        for unit in units:
            executor.submit(RunUnit(call_id, Unit(unit.index, unit.text, unit.field)))
        executor.submit(CloseCall(call_id, full_text, len(units)))
        try:
            event = await done
        except asyncio.CancelledError:  # the client cancelled: stop the tool
            executor.submit(CancelCall(call_id, "the MCP client cancelled"))
            raise
        finally:
            session.waiting.pop(call_id, None)
            session.used = time.monotonic()
            if session_id is None:  # stateless: this call's session only
                await session.close()
                self._sessions.pop(session.key, None)
        if isinstance(event, CallFailed):
            return False, f"{event.code.value}: {event.message}"
        return event.outcome.ok, event.outcome.output

    def _session(self, session_id: str | None) -> _Session:
        key = session_id or f"call-{uuid.uuid4().hex[:12]}"
        session = self._sessions.get(key)
        if session is None:
            session = self._sessions[key] = _Session(self._registry, self._call_timeout, key)
        return session

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(min(30.0, self._session_idle / 2))
            now = time.monotonic()
            for key, session in list(self._sessions.items()):
                if not session.waiting and now - session.used > self._session_idle:
                    self._sessions.pop(key, None)
                    try:
                        await session.close()
                    except Exception as e:  # one session's failure must not end the reaper
                        log.warning("mcp session close failed", error=str(e))
                    log.info("mcp session closed (idle)", session=session.label)

    # ---- the HTTP server ------------------------------------------------

    def _app(self, host: str):
        app = self._server().streamable_http_app(
            streamable_http_path=MCP_PATH, host=host, session_idle_timeout=self._session_idle
        )
        if not self._security.tokens:
            return app
        # Certificates were checked in the handshake (with --tls-ca); names
        # cannot be read here, so only the tokens judge.
        tokens_only = ServerSecurity(tokens=self._security.tokens)

        async def guarded(scope, receive, send):
            if scope["type"] not in ("http", "lifespan"):
                return  # no websockets here: the connection is closed unanswered
            if scope["type"] == "http":
                headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
                metadata = authorization_metadata(headers.get(AUTHORIZATION_KEY))
                verdict = refuse(tokens_only, metadata, set(), "mcp", MCP_PATH)
                if verdict is not None:
                    body = json.dumps({"error": verdict.message}).encode()
                    await send(
                        {
                            "type": "http.response.start",
                            "status": 401,
                            "headers": [
                                (b"content-type", b"application/json"),
                                (b"www-authenticate", b'Bearer realm="conveyor"'),
                            ],
                        }
                    )
                    await send({"type": "http.response.body", "body": body})
                    return
            await app(scope, receive, send)

        return guarded

    async def start(self, host: str, port: int) -> int:
        import socket
        import ssl

        import uvicorn

        # Bound here, so a port in use is an OSError for the caller (uvicorn
        # would sys.exit inside its task).
        sock = socket.create_server((host, port), reuse_port=False)
        self._security.warn_if_exposed("mcp", host)
        tls = self._security.tls
        config = uvicorn.Config(
            self._app(host),
            host=host,
            port=port,
            log_level="warning",
            lifespan="on",
            ssl_certfile=tls.cert if tls else None,
            ssl_keyfile=tls.key if tls else None,
            ssl_ca_certs=tls.ca if tls and tls.ca else None,
            ssl_cert_reqs=ssl.CERT_REQUIRED if tls and tls.ca else ssl.CERT_NONE,
            timeout_graceful_shutdown=2,
        )
        self._uvicorn = uvicorn.Server(config)
        self._serving = asyncio.create_task(self._uvicorn.serve(sockets=[sock]), name="mcp http")
        while not self._uvicorn.started:
            if self._serving.done():
                self._serving.result()  # raises why it could not start
                raise RuntimeError(f"the MCP server could not listen on {host}:{port}")
            await asyncio.sleep(0.02)
        self._reaper = asyncio.create_task(self._reap(), name="mcp session reaper")
        bound = sock.getsockname()[1]
        log.info("mcp listening", host=host, port=bound, path=MCP_PATH)
        return bound

    async def stop(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
            try:
                await asyncio.wait_for(self._serving, 10)
            except (TimeoutError, asyncio.CancelledError):
                self._serving.cancel()
        for session in list(self._sessions.values()):
            await session.close()
        self._sessions.clear()


def _session_id(ctx) -> str | None:
    """The id of the MCP session the SDK routed this call to (MCP's session
    protocol), never a header the client could set on a stateless request;
    None on the stateless protocol. The SDK keeps it on private state (mcp
    2.3); where that is missing, each call gets a fresh session."""
    connection = getattr(getattr(ctx, "session", None), "_connection", None)
    session_id = getattr(connection, "session_id", None)
    return session_id if isinstance(session_id, str) and session_id else None
