"""Builds the gateway's gRPC server (the seam tests call)."""

from __future__ import annotations

import weakref

import grpc
import structlog
from conveyor.v1 import tool_gateway_pb2, tool_gateway_pb2_grpc

from conveyor_common.server import (
    add_standard_services,
    bind,
    new_server,
    on_stop,
    serve_health,
    stop_server,
)
from tool_gateway.config import GatewayConfig
from tool_gateway.mcp_server import GatewayMcpServer
from tool_gateway.registry import ToolRegistry, build_registry
from tool_gateway.servicer import ToolGatewayServicer

log = structlog.get_logger("gateway")

_mcp_ports: weakref.WeakKeyDictionary[grpc.aio.Server, int] = weakref.WeakKeyDictionary()


def mcp_port(server: grpc.aio.Server) -> int | None:
    """The port of the gateway's MCP server; None when off."""
    return _mcp_ports.get(server)


SERVICE_NAME = tool_gateway_pb2.DESCRIPTOR.services_by_name["ToolGatewayService"].full_name


async def create_server(
    config: GatewayConfig,
    host: str | None = None,
    port: int | None = None,
    *,
    registry: ToolRegistry | None = None,
) -> tuple[grpc.aio.Server, int]:
    """Checks the sandbox, starts the server, sets health SERVING; returns
    the server and its bound port. `host`/`port` default to the config's;
    `registry` to the built-in tools (tests pass their own). Raises
    SandboxUnavailable when code cannot be sandboxed and allow_unsandboxed
    is off."""
    registry = registry or await build_registry(config)
    security = config.security
    server = new_server(interceptors=security.interceptors())
    servicer = ToolGatewayServicer(registry, config.call_timeout)
    tool_gateway_pb2_grpc.add_ToolGatewayServiceServicer_to_server(servicer, server)
    health = add_standard_services(server, [SERVICE_NAME])
    host = config.host if host is None else host
    bound = bind(server, host, config.port if port is None else port, security)
    if security.health_port:
        await serve_health(server, host, security.health_port)
    on_stop(server, registry.close)  # run in reverse: MCP servers stop after the calls
    on_stop(server, servicer.shutdown)
    try:
        # Checked before anything starts: a bad MCP setting fails the start cleanly.
        mcp = (
            GatewayMcpServer(registry, config.call_timeout, security, config.mcp_session_idle)
            if config.mcp_port is not None
            else None
        )
        await server.start()
        if mcp is not None:
            _mcp_ports[server] = await mcp.start(host, config.mcp_port)
            on_stop(server, mcp.stop)
    except BaseException:
        await stop_server(server, 0)  # the calls, the MCP servers, the health port
        raise
    await health.set(True)
    log.info("serving", port=bound, tools=registry.names())
    return server, bound
