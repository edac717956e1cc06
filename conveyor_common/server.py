"""Server bootstrap shared by the services: health, reflection, the request
interceptor, metrics, and graceful stop on SIGTERM."""

from __future__ import annotations

import asyncio
import inspect
import os
import shutil
import signal
import tempfile
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from prometheus_client import start_http_server

from conveyor_common import tracing
from conveyor_common.interceptors import RequestContextInterceptor
from conveyor_common.security import ServerSecurity

log = structlog.get_logger("server")

# Clients re-resolve DNS when a connection ages out, so new replicas get traffic.
SERVER_OPTIONS = [
    ("grpc.max_connection_age_ms", 5 * 60 * 1000),
    ("grpc.max_connection_age_grace_ms", 60 * 1000),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]


def new_server(
    max_receive_bytes: int | None = None,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
) -> grpc.aio.Server:
    """A server with the request interceptor outermost (so calls refused by
    the later `interceptors`, e.g. authentication, are logged and counted);
    `max_receive_bytes` caps each request message (bigger ones end
    RESOURCE_EXHAUSTED before any handler)."""
    options = list(SERVER_OPTIONS)
    if max_receive_bytes is not None:
        options = [o for o in options if o[0] != "grpc.max_receive_message_length"]
        options.append(("grpc.max_receive_message_length", max_receive_bytes))
    return grpc.aio.server(
        interceptors=[RequestContextInterceptor(), *interceptors], options=options
    )


# Server reflection's current name; grpcio-reflection serves only v1alpha.
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def add_standard_services(server: grpc.aio.Server, service_names: Iterable[str]) -> HealthState:
    """Adds health (NOT_SERVING until set) and reflection, v1 and v1alpha."""
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    names = list(service_names)
    _add_reflection(server, [*names, health.SERVICE_NAME, reflection.SERVICE_NAME, REFLECTION_V1])
    state = HealthState(servicer, names)
    _extras[server] = ServerExtras(health=state)
    return state


def _add_reflection(server: grpc.aio.Server, names: list[str]) -> None:
    """One reflection servicer under both names. v1 is v1alpha renamed: the
    same messages, fields and numbers (grpc/reflection/v1/reflection.proto),
    so v1alpha's codecs serve v1 clients (grpcurl, Postman, grpcui) too."""
    servicer = reflection.aio.ReflectionServicer(names)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    v1 = grpc.method_handlers_generic_handler(
        REFLECTION_V1,
        {
            "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                servicer.ServerReflectionInfo,
                request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
                response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers((v1,))


class HealthState:
    def __init__(self, servicer, service_names: list[str]):
        self.servicer = servicer
        self.names = service_names

    async def set(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ["", *self.names]:
            await self.servicer.set(name, status)


@dataclass
class ServerExtras:
    """What stopping a server must also stop: health, and the service's own
    resources (an engine thread, tool processes, channels)."""

    health: HealthState
    on_stop: list[Callable] = field(default_factory=list)
    tasks: list[asyncio.Task] = field(default_factory=list)
    socket: str = ""  # private_socket's target, when it has one


_extras: weakref.WeakKeyDictionary[grpc.aio.Server, ServerExtras] = weakref.WeakKeyDictionary()


def extras(server: grpc.aio.Server) -> ServerExtras:
    return _extras[server]


def on_stop(server: grpc.aio.Server, callback: Callable) -> None:
    """Registers a cleanup (plain or async) that stop_server runs after the server stops."""
    _extras[server].on_stop.append(callback)


async def stop_server(server: grpc.aio.Server, grace: float | None = None) -> None:
    """Health to NOT_SERVING, stop with a grace period, then run the cleanups."""
    ext = _extras.get(server)
    if ext is not None:
        await ext.health.set(False)
    await server.stop(grace)
    if ext is not None:
        for task in ext.tasks:
            task.cancel()
        for callback in reversed(ext.on_stop):
            result = callback()
            if inspect.isawaitable(result):
                await result


def bind(
    server: grpc.aio.Server, host: str, port: int, security: ServerSecurity | None = None
) -> int:
    """Listens on host:port: TLS when `security` has a certificate, else
    plaintext (with a warning beyond loopback)."""
    security = security or ServerSecurity()
    if host.startswith("unix:"):
        # Unix sockets are reserved for private_socket (the front door's trust).
        raise ValueError(f"--host {host}: serve on a TCP interface")
    address = f"{host}:{port}"
    if security.tls is not None:
        bound = server.add_secure_port(address, security.tls.server_credentials())
    else:
        bound = server.add_insecure_port(address)
    if bound == 0:
        raise RuntimeError(f"could not bind {address}")
    security.warn_if_exposed(_service_of(server), host)
    return bound


def _service_of(server: grpc.aio.Server) -> str:
    ext = _extras.get(server)
    return ",".join(ext.health.names) if ext is not None else ""


async def serve_health(server: grpc.aio.Server, host: str, port: int) -> int:
    """Serves `server`'s health service alone, in plaintext, on host:port:
    for probes that cannot present TLS or tokens. Stops with `server`."""
    probe = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(_extras[server].health.servicer, probe)
    bound = probe.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise RuntimeError(f"could not bind the health port {host}:{port}")
    await probe.start()
    on_stop(server, lambda: probe.stop(0))
    log.info("health listening", host=host, port=bound)
    return bound


def private_socket(server: grpc.aio.Server) -> str:
    """A plaintext Unix socket on `server`, in a fresh directory only this
    user can enter: how the HTTP front door reaches the gRPC API in-process
    whatever TLS the public port has. The door's calls carry the auth
    interceptor's local secret, which admits them on this socket only."""
    directory = tempfile.mkdtemp(prefix="conveyor-")
    os.chmod(directory, 0o700)
    target = f"unix:{directory}/grpc.sock"
    if server.add_insecure_port(target) == 0:
        raise RuntimeError(f"could not bind {target}")
    on_stop(server, lambda: shutil.rmtree(directory, ignore_errors=True))
    _extras[server].socket = target
    return target


def start_metrics(port: int, host: str) -> None:
    """Prometheus on `host` (the service's own --host: loopback by default)."""
    if port:
        start_http_server(port, addr=host)
        log.info("metrics listening", host=host, port=port)


async def run_until_signal(server: grpc.aio.Server, grace: float) -> None:
    """Waits for SIGTERM or SIGINT, then stops gracefully so in-flight streams
    can finish."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping", grace_seconds=grace)
    await stop_server(server, grace)
    tracing.shutdown()  # what is still batched goes out
