"""python -m scheduler: the public Conveyor API."""

from __future__ import annotations

import asyncio

import structlog

from conveyor_common import tracing
from conveyor_common.logs import configure_logging
from conveyor_common.server import run_until_signal, start_metrics
from scheduler.config import SchedulerConfig, build_parser
from scheduler.server import create_server


async def _main() -> None:
    args = build_parser().parse_args()
    configure_logging("scheduler")
    tracing.configure("scheduler", args.otlp_endpoint)
    start_metrics(args.metrics_port, args.host)
    server, port = await create_server(SchedulerConfig.from_args(args), args.host, args.port)
    structlog.get_logger("scheduler").info("listening", port=port)
    await run_until_signal(server, args.grace)


if __name__ == "__main__":
    asyncio.run(_main())
