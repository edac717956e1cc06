"""python -m tool_gateway: host the tools over gRPC."""

from __future__ import annotations

import asyncio
import sys

import structlog

from conveyor_common import tracing
from conveyor_common.logs import configure_logging
from conveyor_common.server import run_until_signal, start_metrics
from tool_gateway.config import GatewayConfig, build_parser
from tool_gateway.sandbox import SandboxUnavailable
from tool_gateway.server import create_server

log = structlog.get_logger("gateway")


async def _main() -> int:
    args = build_parser().parse_args()
    configure_logging("tool_gateway")
    tracing.configure("tool_gateway", args.otlp_endpoint)
    config = GatewayConfig.from_args(args)
    start_metrics(config.metrics_port, config.host)
    try:
        server, port = await create_server(config)
    except SandboxUnavailable as e:
        log.error("cannot start", error=str(e))
        return 2
    log.info("listening", port=port)
    await run_until_signal(server, args.grace)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(_main()))
