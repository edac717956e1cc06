"""Builds the scheduler's gRPC server (the seam tests call)."""

from __future__ import annotations

import weakref

import grpc
from conveyor.v1 import conveyor_pb2, conveyor_pb2_grpc

from conveyor_common.security import AuthInterceptor
from conveyor_common.server import (
    add_standard_services,
    bind,
    new_server,
    on_stop,
    private_socket,
    serve_health,
    stop_server,
)
from scheduler.config import SchedulerConfig
from scheduler.gateway_client import GatewayClient
from scheduler.openai_http import ChatCompletions, HttpFrontDoor
from scheduler.servicer import ConveyorServicer
from scheduler.worker_client import WorkerClient

SERVICE_NAME = conveyor_pb2.DESCRIPTOR.services_by_name["ConveyorService"].full_name


async def create_server(
    config: SchedulerConfig, host: str = "127.0.0.1", port: int = 0
) -> tuple[grpc.aio.Server, int]:
    worker = WorkerClient(config.worker_target, config.connect_timeout, config.downstream)
    gateway = GatewayClient(config.gateway_target, config.connect_timeout, config.downstream)
    security = config.security
    interceptors = security.interceptors()
    server = new_server(max_receive_bytes=config.max_request_bytes, interceptors=interceptors)
    # What the HTTP front door shows the auth interceptor on the private socket.
    local = next((i.local_metadata() for i in interceptors if isinstance(i, AuthInterceptor)), ())
    conveyor_pb2_grpc.add_ConveyorServiceServicer_to_server(
        ConveyorServicer(config, worker, gateway), server
    )
    health = add_standard_services(server, [SERVICE_NAME])
    bound = bind(server, host, port, security)
    # Bound before start: a server takes no new ports once started.
    loopback = private_socket(server) if config.http_port is not None else ""
    if security.health_port:
        await serve_health(server, host, security.health_port)
    on_stop(server, worker.close)
    on_stop(server, gateway.close)
    try:
        await server.start()
        if config.http_port is not None:
            await _start_http(server, config, worker, host, loopback, local)
    except BaseException:
        await stop_server(server, 0)  # the health port, the socket, the channels
        raise
    # The scheduler holds no model: it serves once listening; a missing
    # downstream shows up as a clear UNAVAILABLE on the run.
    await health.set(True)
    return server, bound


_http_ports: weakref.WeakKeyDictionary[grpc.aio.Server, int] = weakref.WeakKeyDictionary()


def http_port(server: grpc.aio.Server) -> int | None:
    """The port of the server's OpenAI-compatible HTTP API; None when off."""
    return _http_ports.get(server)


async def _start_http(
    server,
    config: SchedulerConfig,
    worker: WorkerClient,
    host: str,
    socket: str,
    local: tuple[tuple[str, str], ...],
) -> None:
    """The HTTP front door checks each caller itself (the same TLS and
    tokens as the gRPC port), then calls this server's Run over its private
    Unix socket, so every limit, metric and cancel is Run's."""
    channel = grpc.aio.insecure_channel(socket)
    handlers = ChatCompletions(
        conveyor_pb2_grpc.ConveyorServiceStub(channel),
        worker.model_name,
        config.run_timeout,
        local,
    )
    door = HttpFrontDoor(handlers, config.security)
    _http_ports[server] = await door.start(host, config.http_port)
    on_stop(server, door.stop)
    on_stop(server, channel.close)
