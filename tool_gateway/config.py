"""Command-line flags of the gateway and the config they make."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from conveyor_common.defaults import GATEWAY_METRICS_PORT, GATEWAY_PORT
from conveyor_common.flags import add_server_flags


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tool_gateway", description="Conveyor tool gateway")
    add_server_flags(p, GATEWAY_PORT, GATEWAY_METRICS_PORT)
    p.add_argument(
        "--allow-unsandboxed",
        action="store_true",
        help="when bubblewrap is missing, run code with rlimits only (unsafe; logs a warning)",
    )
    p.add_argument("--unit-timeout", type=float, default=30.0, help="seconds per command unit")
    p.add_argument(
        "--call-timeout",
        type=float,
        default=300.0,
        help="seconds per call (a request may lower it)",
    )
    p.add_argument(
        "--memory-mb", type=int, default=2048, help="address-space limit of an interpreter"
    )
    p.add_argument("--cpu-seconds", type=int, default=120, help="CPU time limit per session")
    p.add_argument(
        "--max-processes",
        type=int,
        default=128,
        help="processes and threads one interpreter's sandbox may hold (a pids cgroup)",
    )
    p.add_argument(
        "--output-cap", type=int, default=64 * 1024, help="bytes of stdout/stderr kept per unit"
    )
    p.add_argument(
        "--tools-file",
        default="",
        help="YAML file of OpenAI-style function specs mapped to handlers (see plugins.py)",
    )
    p.add_argument(
        "--search-url",
        default="",
        help="search API the search tool calls (GET ?q=&k=); empty: the local FTS5 index",
    )
    p.add_argument(
        "--database-path",
        default="",
        help="SQLite file the database tool opens read-only; empty: the built sample database",
    )
    return p


@dataclass(frozen=True)
class GatewayConfig:
    host: str = "0.0.0.0"
    port: int = GATEWAY_PORT
    metrics_port: int = GATEWAY_METRICS_PORT
    allow_unsandboxed: bool = False
    unit_timeout: float = 30.0
    call_timeout: float = 300.0
    memory_mb: int = 2048
    cpu_seconds: int = 120
    output_cap: int = 64 * 1024
    max_processes: int = 128
    tools_file: str = ""
    search_url: str = ""
    database_path: str = ""

    def __post_init__(self) -> None:
        for name in (
            "unit_timeout",
            "call_timeout",
            "memory_mb",
            "cpu_seconds",
            "output_cap",
            "max_processes",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive (got {getattr(self, name)})")

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> GatewayConfig:
        return cls(
            host=ns.host,
            port=ns.port,
            metrics_port=ns.metrics_port,
            allow_unsandboxed=ns.allow_unsandboxed,
            unit_timeout=ns.unit_timeout,
            call_timeout=ns.call_timeout,
            memory_mb=ns.memory_mb,
            cpu_seconds=ns.cpu_seconds,
            output_cap=ns.output_cap,
            max_processes=ns.max_processes,
            tools_file=ns.tools_file,
            search_url=ns.search_url,
            database_path=ns.database_path,
        )
