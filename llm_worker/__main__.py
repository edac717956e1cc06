"""python -m llm_worker: serve a model over gRPC."""

from __future__ import annotations

import asyncio

import structlog

from conveyor_common import tracing
from conveyor_common.logs import configure_logging
from conveyor_common.server import run_until_signal, start_metrics
from llm_worker.config import WorkerConfig, build_parser
from llm_worker.server import create_server


async def _main() -> None:
    args = build_parser().parse_args()
    configure_logging("llm_worker")
    tracing.configure("llm_worker", args.otlp_endpoint)
    start_metrics(args.metrics_port, args.host)
    server, port = await create_server(
        WorkerConfig.from_args(args), args.host, args.port, wait_ready=False
    )
    structlog.get_logger("worker").info("listening", port=port)
    await run_until_signal(server, args.grace)


if __name__ == "__main__":
    asyncio.run(_main())
