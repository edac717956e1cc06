"""Flags every service has: where it listens, its metrics port, and how long
it lets in-flight streams finish on SIGTERM."""

from __future__ import annotations

import argparse

from conveyor_common.defaults import DEFAULT_HOST


def add_server_flags(parser: argparse.ArgumentParser, port: int, metrics_port: int) -> None:
    parser.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help="interface to listen on, metrics included (0.0.0.0: every interface; the "
        "services have no authentication yet, so only on a private network)",
    )
    parser.add_argument("--port", type=int, default=port)
    parser.add_argument("--metrics-port", type=int, default=metrics_port, help="0 disables")
    parser.add_argument(
        "--grace", type=float, default=5.0, help="seconds to finish streams on SIGTERM"
    )
