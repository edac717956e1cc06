"""An MCP server written with the official SDK's low-level Server, for the
gateway's MCP client tests: over streamable HTTP in the test's own event
loop (`serve_http`), or over stdio as its own process (`python -m
tests.mcp_servers.sdk_server`). What its tools saw goes to EVENTS (in-process) or
to the file named by $SDK_SERVER_EVENTS (stdio)."""

from __future__ import annotations

import asyncio
import os
import sys

import anyio
import mcp_types as types
from mcp.server import Server

EVENTS: list[str] = []
# The HTTP server wants this header value on every request (set by the test).
REQUIRED_HEADER: dict[str, str] = {}


def _event(text: str) -> None:
    EVENTS.append(text)
    if path := os.environ.get("SDK_SERVER_EVENTS"):
        with open(path, "a") as f:
            f.write(text + "\n")


TOOLS = [
    types.Tool(
        name="slow_count",
        description="Counts to n, reporting progress at each step.",
        input_schema={
            "type": "object",
            "properties": {"n": {"type": "integer"}, "delay": {"type": "number"}},
            "required": ["n"],
        },
    ),
    types.Tool(
        name="sleeper",
        description="Sleeps for the given seconds.",
        input_schema={"type": "object", "properties": {"seconds": {"type": "number"}}},
    ),
    types.Tool(
        name="echo",
        description="Echoes its text, with the process id.",
        input_schema={"type": "object", "properties": {"text": {"type": "string"}}},
    ),
    types.Tool(
        name="die", description="Exits the server process.", input_schema={"type": "object"}
    ),
]


async def list_tools(ctx, params) -> types.ListToolsResult:
    return types.ListToolsResult(tools=TOOLS)


async def call_tool(ctx, params) -> types.CallToolResult:
    args = params.arguments or {}
    if params.name == "slow_count":
        for i in range(1, args["n"] + 1):
            await anyio.sleep(args.get("delay", 0.2))
            await ctx.session.report_progress(i, args["n"], f"step {i}")
        text = f"counted to {args['n']}"
    elif params.name == "sleeper":
        _event("sleeper started")
        try:
            await anyio.sleep(args.get("seconds", 30))
        except anyio.get_cancelled_exc_class():
            _event("sleeper cancelled")
            raise
        text = "slept"
    elif params.name == "echo":
        text = f"{args.get('text', '')} (pid {os.getpid()})"
    elif params.name == "die":
        os._exit(3)
    else:
        return types.CallToolResult(
            content=[types.TextContent(type="text", text=f"no tool {params.name}")], is_error=True
        )
    return types.CallToolResult(content=[types.TextContent(type="text", text=text)])


SERVER = Server("conveyor-test-server", on_list_tools=list_tools, on_call_tool=call_tool)


async def serve_http(port: int = 0):
    """(uvicorn server, its task, bound port) in the running loop."""
    import uvicorn

    app = SERVER.streamable_http_app(streamable_http_path="/mcp", host="127.0.0.1")

    async def checked(scope, receive, send):
        if scope["type"] == "http" and REQUIRED_HEADER:
            headers = {k.decode(): v.decode() for k, v in scope["headers"]}
            if any(headers.get(k) != v for k, v in REQUIRED_HEADER.items()):
                await send({"type": "http.response.start", "status": 403, "headers": []})
                await send({"type": "http.response.body", "body": b"missing header"})
                return
        await app(scope, receive, send)

    server = uvicorn.Server(
        uvicorn.Config(checked, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.02)
    return server, task, server.servers[0].sockets[0].getsockname()[1]


async def _stdio() -> None:
    from mcp.server.stdio import stdio_server

    async with stdio_server() as (read, write):
        await SERVER.run(read, write, SERVER.create_initialization_options())


if __name__ == "__main__":
    sys.exit(asyncio.run(_stdio()))
