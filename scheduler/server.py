"""Builds the scheduler's gRPC server (the seam tests call)."""

from __future__ import annotations

import weakref

import grpc
from conveyor.v1 import conveyor_pb2, conveyor_pb2_grpc

from conveyor_common.server import add_standard_services, bind, new_server, on_stop
from scheduler.config import SchedulerConfig
from scheduler.gateway_client import GatewayClient
from scheduler.openai_http import ChatCompletions, HttpFrontDoor
from scheduler.servicer import ConveyorServicer
from scheduler.worker_client import WorkerClient

SERVICE_NAME = conveyor_pb2.DESCRIPTOR.services_by_name["ConveyorService"].full_name


async def create_server(
    config: SchedulerConfig, host: str = "127.0.0.1", port: int = 0
) -> tuple[grpc.aio.Server, int]:
    worker = WorkerClient(config.worker_target, config.connect_timeout)
    gateway = GatewayClient(config.gateway_target, config.connect_timeout)
    server = new_server(max_receive_bytes=config.max_request_bytes)
    conveyor_pb2_grpc.add_ConveyorServiceServicer_to_server(
        ConveyorServicer(config, worker, gateway), server
    )
    health = add_standard_services(server, [SERVICE_NAME])
    bound = bind(server, host, port)
    on_stop(server, worker.close)
    on_stop(server, gateway.close)
    await server.start()
    if config.http_port is not None:
        await _start_http(server, config, worker, host, bound)
    # The scheduler holds no model: it serves once listening; a missing
    # downstream shows up as a clear UNAVAILABLE on the run.
    await health.set(True)
    return server, bound


_http_ports: weakref.WeakKeyDictionary[grpc.aio.Server, int] = weakref.WeakKeyDictionary()


def http_port(server: grpc.aio.Server) -> int | None:
    """The port of the server's OpenAI-compatible HTTP API; None when off."""
    return _http_ports.get(server)


async def _start_http(server, config: SchedulerConfig, worker: WorkerClient, host, port) -> None:
    """The HTTP front door calls this server's Run over loopback gRPC."""
    loopback = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    channel = grpc.aio.insecure_channel(f"{loopback}:{port}")
    handlers = ChatCompletions(
        conveyor_pb2_grpc.ConveyorServiceStub(channel), worker.model_name, config.run_timeout
    )
    door = HttpFrontDoor(handlers)
    _http_ports[server] = await door.start(host, config.http_port)
    on_stop(server, door.stop)
    on_stop(server, channel.close)
