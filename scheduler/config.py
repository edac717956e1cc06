"""Command-line flags of the scheduler and the config they make."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from conveyor_common.defaults import (
    CONNECT_TIMEOUT_S,
    GATEWAY_PORT,
    SCHEDULER_METRICS_PORT,
    SCHEDULER_PORT,
    WORKER_PORT,
)
from conveyor_common.flags import add_server_flags
from conveyor_common.security import (
    ClientSecurity,
    ClientToken,
    SecurityConfigError,
    ServerSecurity,
    TlsFiles,
    server_security_from_args,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scheduler", description="Conveyor scheduler (public API)")
    add_server_flags(p, SCHEDULER_PORT, SCHEDULER_METRICS_PORT)
    p.add_argument(
        "--worker-target",
        default=f"dns:///localhost:{WORKER_PORT}",
        help="llm_worker address; dns:///name:port balances over every replica",
    )
    p.add_argument(
        "--gateway-target",
        default=f"dns:///localhost:{GATEWAY_PORT}",
        help="tool_gateway address; dns:///name:port balances over every replica",
    )
    p.add_argument("--max-rounds", type=int, default=4, help="default rounds per run")
    p.add_argument(
        "--max-rounds-limit",
        type=int,
        default=MAX_ROUNDS_LIMIT,
        help="the most rounds a request may ask for",
    )
    p.add_argument(
        "--max-abort-retries",
        type=int,
        default=MAX_ABORT_RETRIES,
        help="the most abort retries a request may ask for",
    )
    p.add_argument(
        "--max-request-bytes",
        type=int,
        default=MAX_REQUEST_BYTES,
        help="largest RunRequest accepted (bigger ones get RESOURCE_EXHAUSTED)",
    )
    p.add_argument("--run-timeout", type=float, default=600.0, help="seconds, when no deadline")
    p.add_argument(
        "--http-port",
        type=int,
        default=None,
        help="serve the OpenAI-compatible HTTP API (/v1/chat/completions, /v1/models) on "
        "this port, on --host (default: off; 0 picks a free port)",
    )
    p.add_argument(
        "--connect-timeout",
        type=float,
        default=CONNECT_TIMEOUT_S,
        help="seconds to wait for a connection to the worker or gateway before a run fails",
    )
    down = p.add_argument_group("security of the worker and gateway connections")
    down.add_argument(
        "--downstream-tls-ca",
        default="",
        help="PEM CA that signed the worker's and gateway's certificates: connect with TLS",
    )
    down.add_argument(
        "--downstream-tls-cert",
        default="",
        help="PEM certificate to present to them (mutual TLS; default: --tls-cert)",
    )
    down.add_argument("--downstream-tls-key", default="", help="its key (default: --tls-key)")
    down.add_argument(
        "--downstream-tls-server-name",
        default="",
        help="name to expect on their certificates (default: each target's host)",
    )
    down.add_argument(
        "--downstream-token-file",
        default="",
        help="file whose first token the scheduler sends them as a bearer token",
    )
    return p


def downstream_security_from_args(ns: argparse.Namespace) -> ClientSecurity:
    tls = None
    cert = ns.downstream_tls_cert or (ns.tls_cert if not ns.downstream_tls_key else "")
    key = ns.downstream_tls_key or (ns.tls_key if not ns.downstream_tls_cert else "")
    if ns.downstream_tls_ca:
        tls = TlsFiles(cert or None, key or None, ns.downstream_tls_ca)
    elif ns.downstream_tls_cert or ns.downstream_tls_key:
        raise SecurityConfigError("--downstream-tls-cert needs --downstream-tls-ca")
    return ClientSecurity(
        tls=tls,
        token=ClientToken(ns.downstream_token_file) if ns.downstream_token_file else None,
        server_name=ns.downstream_tls_server_name,
    )


# Server maxima of what a request may ask for (flags above).
MAX_ROUNDS_LIMIT = 16
MAX_ABORT_RETRIES = 4
MAX_REQUEST_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class SchedulerConfig:
    worker_target: str = f"dns:///localhost:{WORKER_PORT}"
    gateway_target: str = f"dns:///localhost:{GATEWAY_PORT}"
    max_rounds: int = 4
    max_rounds_limit: int = MAX_ROUNDS_LIMIT
    max_abort_retries: int = MAX_ABORT_RETRIES
    max_request_bytes: int = MAX_REQUEST_BYTES
    run_timeout: float = 600.0
    connect_timeout: float = CONNECT_TIMEOUT_S
    http_port: int | None = None  # the OpenAI-compatible HTTP API; None: off
    security: ServerSecurity = field(default_factory=ServerSecurity)  # the public API's
    downstream: ClientSecurity = field(default_factory=ClientSecurity)  # worker, gateway

    def __post_init__(self) -> None:
        if not 1 <= self.max_rounds <= self.max_rounds_limit:
            raise ValueError(
                f"max_rounds must be in [1, max_rounds_limit={self.max_rounds_limit}] "
                f"(got {self.max_rounds})"
            )
        for name in ("max_request_bytes", "run_timeout", "connect_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive (got {getattr(self, name)})")
        if self.http_port is not None and not 0 <= self.http_port < 65536:
            raise ValueError(f"http_port must be in [0, 65535] (got {self.http_port})")
        if self.max_abort_retries < 0:
            raise ValueError(f"max_abort_retries must be >= 0 (got {self.max_abort_retries})")

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> SchedulerConfig:
        return cls(
            worker_target=ns.worker_target,
            gateway_target=ns.gateway_target,
            max_rounds=ns.max_rounds,
            max_rounds_limit=ns.max_rounds_limit,
            max_abort_retries=ns.max_abort_retries,
            max_request_bytes=ns.max_request_bytes,
            run_timeout=ns.run_timeout,
            connect_timeout=ns.connect_timeout,
            http_port=ns.http_port,
            security=server_security_from_args(ns),
            downstream=downstream_security_from_args(ns),
        )
