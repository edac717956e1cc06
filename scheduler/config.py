"""Command-line flags of the scheduler and the config they make."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from conveyor_common.defaults import (
    GATEWAY_PORT,
    SCHEDULER_METRICS_PORT,
    SCHEDULER_PORT,
    WORKER_PORT,
)
from conveyor_common.flags import add_server_flags


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
    p.add_argument("--run-timeout", type=float, default=600.0, help="seconds, when no deadline")
    return p


@dataclass(frozen=True)
class SchedulerConfig:
    worker_target: str = f"dns:///localhost:{WORKER_PORT}"
    gateway_target: str = f"dns:///localhost:{GATEWAY_PORT}"
    max_rounds: int = 4
    run_timeout: float = 600.0

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> SchedulerConfig:
        return cls(
            worker_target=ns.worker_target,
            gateway_target=ns.gateway_target,
            max_rounds=ns.max_rounds,
            run_timeout=ns.run_timeout,
        )
