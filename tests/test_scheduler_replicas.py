"""A scheduler balancing over two gateway replicas (one target naming both
addresses, round-robin): a replica that dies fails only the runs it was
serving, each with a clear reason, and new runs go to the replica left."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest
from conveyor.v1 import common_pb2, conveyor_pb2, conveyor_pb2_grpc

from conveyor_common.server import stop_server
from tests.test_integration import FILLER, collect, run_request
from tool_gateway.config import GatewayConfig

SLOW = (
    "<tool_call>"
    + json.dumps(
        {"name": "python", "arguments": {"code": "import time\ntime.sleep(3)\nprint('slept')\n"}}
    )
    + "</tool_call>"
)
QUICK = "```python\nprint(6 * 7)\n```\n"


@pytest.fixture
async def two_gateways_and_a_scheduler(worker):
    from scheduler.config import SchedulerConfig
    from scheduler.server import create_server as create_scheduler
    from tool_gateway.server import create_server as create_gateway

    gateways = [
        await create_gateway(GatewayConfig(unit_timeout=20.0), "127.0.0.1", 0) for _ in range(2)
    ]
    target = "ipv4:" + ",".join(f"127.0.0.1:{port}" for _, port in gateways)
    _, worker_target = worker
    scheduler, port = await create_scheduler(
        SchedulerConfig(worker_target=worker_target, gateway_target=target)
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield conveyor_pb2_grpc.ConveyorServiceStub(channel), gateways
    await stop_server(scheduler, 0)
    for server, _ in gateways:
        await stop_server(server, 0)


def outcome(events) -> tuple[int, list[str]]:
    """The finish reason and each call's output or error message."""
    calls = []
    for e in events:
        if e.WhichOneof("event") == "tool_call_finished":
            f = e.tool_call_finished
            calls.append(
                f.result.output if f.WhichOneof("outcome") == "result" else f.error.message
            )
    return events[-1].run_finished.finish_reason, calls


async def test_a_dead_replica_fails_only_its_own_runs(two_gateways_and_a_scheduler):
    stub, gateways = two_gateways_and_a_scheduler
    mode = conveyor_pb2.EXECUTION_MODE_PARTIAL
    runs = [
        asyncio.create_task(collect(stub, run_request([SLOW + FILLER[:100], "ok"], mode)))
        for _ in range(4)
    ]
    await asyncio.sleep(1.5)  # every run's sleeping unit is running on one of the two
    await stop_server(gateways[0][0], 0)  # replica 0 dies mid-call
    results = [outcome(await run) for run in runs]

    served = [calls for reason, calls in results if calls == ["slept"]]
    failed = [calls for reason, calls in results if calls != ["slept"]]
    assert served and failed, f"round-robin should have used both replicas: {results}"
    for reason, calls in results:
        assert (
            reason == common_pb2.FINISH_REASON_FORCED_END
        )  # a dead tool fails a call, not the run
        if calls != ["slept"]:
            assert len(calls) == 1 and "tool_gateway" in calls[0] and "UNAVAILABLE" in calls[0]

    # New runs go to the replica left, every one of them.
    later = await asyncio.gather(
        *(collect(stub, run_request([QUICK, "ok"], mode)) for _ in range(4))
    )
    assert [outcome(events)[1] for events in later] == [["42"]] * 4
