"""End to end on the real default model (SmolLM2-135M-Instruct from the
embedded GGUF): the model writes Python, the sandbox runs it, the result goes
back for a second round."""

from __future__ import annotations

import grpc
import pytest
from conveyor.v1 import common_pb2, conveyor_pb2, conveyor_pb2_grpc

from conveyor_common.cli import DEFAULT_PROMPT, DEFAULT_SYSTEM
from conveyor_common.server import stop_server

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
async def real_stack(gateway):
    from llm_worker.config import WorkerConfig
    from llm_worker.server import create_server as create_worker
    from scheduler.config import SchedulerConfig
    from scheduler.server import create_server as create_scheduler

    worker, worker_port = await create_worker(WorkerConfig(), "127.0.0.1", 0)
    scheduler, port = await create_scheduler(
        SchedulerConfig(worker_target=f"127.0.0.1:{worker_port}", gateway_target=gateway)
    )
    yield f"127.0.0.1:{port}"
    await stop_server(scheduler, 0)
    await stop_server(worker, 0)


async def test_the_default_model_writes_python_that_runs(real_stack):
    request = conveyor_pb2.RunRequest(
        messages=[
            common_pb2.ChatMessage(role=common_pb2.ROLE_SYSTEM, content=DEFAULT_SYSTEM),
            common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=DEFAULT_PROMPT),
        ],
        sampling=common_pb2.SamplingParams(max_new_tokens=120),  # greedy
        max_rounds=2,
    )
    async with grpc.aio.insecure_channel(real_stack) as channel:
        stub = conveyor_pb2_grpc.ConveyorServiceStub(channel)
        events = [r async for r in stub.Run(request, timeout=300)]
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[-1] == "run_finished"
    assert "tool_call_started" in kinds, "the model wrote no ```python block"
    results = [e.unit_result.result for e in events if e.WhichOneof("event") == "unit_result"]
    assert results and all(r.ok for r in results), [r.exception for r in results]
    assert any("385" in r.stdout for r in results)
    timing = events[-1].run_finished.timing
    assert timing.rounds == 2 and timing.units_dispatched == len(results)
    assert timing.decode_seconds > 0 and timing.total_seconds >= timing.decode_seconds
