"""Command-line flags of the gateway and the config they make."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from conveyor_common.defaults import DEFAULT_HOST, GATEWAY_METRICS_PORT, GATEWAY_PORT
from conveyor_common.flags import add_server_flags
from conveyor_common.security import ServerSecurity, server_security_from_args

# A sandbox's /tmp (memory: it comes out of --memory-mb).
DEFAULT_TMP_MB = 256
# What --memory-mb must leave for an interpreter's address space besides /tmp
# (a bare one starts in ~30 MiB; with numpy, torch and matplotlib it maps ~800).
MIN_ADDRESS_SPACE_MB = 256
# Interpreters alive at once: bounds the host memory they take and the
# gateway memory their frames can (python_tool.session_memory_bound each).
DEFAULT_MAX_SESSIONS = 128


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
        "--memory-mb",
        type=int,
        default=2048,
        help="memory of an interpreter: its address space and, in the sandbox, its /tmp",
    )
    p.add_argument(
        "--tmp-mb",
        type=int,
        default=DEFAULT_TMP_MB,
        help="size of a sandbox's private /tmp, in memory, taken from --memory-mb",
    )
    p.add_argument("--cpu-seconds", type=int, default=120, help="CPU time limit per session")
    p.add_argument(
        "--max-sessions",
        type=int,
        default=DEFAULT_MAX_SESSIONS,
        help="python interpreters alive at once; a call past it fails with a clear error",
    )
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
    p.add_argument(
        "--mcp-port",
        type=int,
        default=None,
        help="also serve the tools over MCP (streamable HTTP at /mcp) on this port, on --host, "
        "with the same TLS and tokens (default: off; 0 picks a free port)",
    )
    p.add_argument(
        "--mcp-session-idle",
        type=float,
        default=600.0,
        help="seconds an idle MCP session keeps its interpreters",
    )
    return p


@dataclass(frozen=True)
class GatewayConfig:
    host: str = DEFAULT_HOST
    port: int = GATEWAY_PORT
    metrics_port: int = GATEWAY_METRICS_PORT
    allow_unsandboxed: bool = False
    unit_timeout: float = 30.0
    call_timeout: float = 300.0
    memory_mb: int = 2048
    tmp_mb: int = DEFAULT_TMP_MB
    max_sessions: int = DEFAULT_MAX_SESSIONS
    cpu_seconds: int = 120
    output_cap: int = 64 * 1024
    max_processes: int = 128
    tools_file: str = ""
    search_url: str = ""
    database_path: str = ""
    mcp_port: int | None = None  # serve the tools over MCP (streamable HTTP); None: off
    mcp_session_idle: float = 600.0
    security: ServerSecurity = field(default_factory=ServerSecurity)

    def __post_init__(self) -> None:
        for name in (
            "unit_timeout",
            "call_timeout",
            "memory_mb",
            "tmp_mb",
            "max_sessions",
            "cpu_seconds",
            "output_cap",
            "max_processes",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive (got {getattr(self, name)})")
        if self.memory_mb - self.tmp_mb < MIN_ADDRESS_SPACE_MB:
            raise ValueError(
                f"tmp_mb ({self.tmp_mb}) must leave at least {MIN_ADDRESS_SPACE_MB} MiB of "
                f"memory_mb ({self.memory_mb}) to the interpreter's address space"
            )

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
            tmp_mb=ns.tmp_mb,
            max_sessions=ns.max_sessions,
            cpu_seconds=ns.cpu_seconds,
            output_cap=ns.output_cap,
            max_processes=ns.max_processes,
            tools_file=ns.tools_file,
            search_url=ns.search_url,
            database_path=ns.database_path,
            mcp_port=ns.mcp_port,
            mcp_session_idle=ns.mcp_session_idle,
            security=server_security_from_args(ns),
        )
