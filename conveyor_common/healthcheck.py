"""`python -m conveyor_common.healthcheck --port N`: asks the gRPC server on
that port for its standard health status (grpc.health.v1 Check), prints it,
and exits 0 only when it is SERVING, 1 otherwise.

docker-compose.yml's health checks and the local stack runner use it. It is a
one-shot process, so plain synchronous gRPC is enough.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING


@dataclass(frozen=True)
class HealthResult:
    """The answer of one health check."""

    target: str
    service: str
    # A HealthCheckResponse status name (SERVING, NOT_SERVING, ...) or, when
    # the call itself failed, the gRPC status code's name (UNAVAILABLE, ...).
    status: str
    serving: bool
    detail: str = ""

    def __str__(self) -> str:
        line = f"{self.target} service={self.service or '(server)'} {self.status}"
        return f"{line}: {self.detail}" if self.detail else line


def _port(text: str) -> int:
    port = int(text)
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"{port} is not a TCP port")
    return port


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m conveyor_common.healthcheck",
        description="Exit 0 when a gRPC server's standard health check says SERVING.",
    )
    p.add_argument("--port", type=_port, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument(
        "--service",
        default="",
        help="service name to check, e.g. conveyor.v1.ConveyorService; empty means the server",
    )
    p.add_argument("--timeout", type=float, default=3.0, help="seconds for the whole check")
    return p


def _target(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):  # a bare IPv6 address
        host = f"[{host}]"
    return f"{host}:{port}"


def check(
    port: int, host: str = "127.0.0.1", service: str = "", timeout: float = 3.0
) -> HealthResult:
    """Calls Check once; never raises for gRPC failures."""
    target = _target(host, port)
    # A health check of a local port must never go through an HTTP proxy.
    with grpc.insecure_channel(target, options=[("grpc.enable_http_proxy", 0)]) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as err:
            code = err.code() if callable(getattr(err, "code", None)) else None
            details = err.details() if callable(getattr(err, "details", None)) else str(err)
            name = code.name if code is not None else "ERROR"
            if code is grpc.StatusCode.NOT_FOUND:
                details = f"the server does not know the service {service!r}"
            elif code is grpc.StatusCode.UNIMPLEMENTED:
                details = "the server has no grpc.health.v1 health service"
            return HealthResult(target, service, name, False, details or "")
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return HealthResult(target, service, status, response.status == SERVING)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = check(args.port, args.host, args.service, args.timeout)
    print(result, file=sys.stdout if result.serving else sys.stderr)
    return 0 if result.serving else 1


if __name__ == "__main__":
    sys.exit(main())
