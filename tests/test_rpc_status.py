"""grpc_server_handled_total counts each RPC under the status it really
ended with: a client cancel is CANCELLED and a passed deadline is
DEADLINE_EXCEEDED, on the worker as on the scheduler (one interceptor)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from conveyor.v1 import common_pb2, llm_worker_pb2, llm_worker_pb2_grpc
from prometheus_client import REGISTRY


def handled(code: str) -> float:
    labels = {
        "grpc_service": "conveyor.v1.LlmWorkerService",
        "grpc_method": "Generate",
        "grpc_code": code,
    }
    return REGISTRY.get_sample_value("grpc_server_handled_total", labels) or 0.0


def long_request() -> llm_worker_pb2.GenerateRequest:
    return llm_worker_pb2.GenerateRequest(
        messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="Hi")],
        forced_decoding=common_pb2.ForcedDecoding(completion=" word" * 3000),
    )


async def until_counted(code: str, before: float) -> float:
    for _ in range(200):
        if handled(code) > before:
            break
        await asyncio.sleep(0.025)
    return handled(code)


@pytest.fixture
async def stub(worker):
    _, target = worker
    async with grpc.aio.insecure_channel(target) as channel:
        yield llm_worker_pb2_grpc.LlmWorkerServiceStub(channel)


async def test_a_cancelled_generate_counts_as_cancelled(stub):
    before, ok_before = handled("CANCELLED"), handled("OK")
    call = stub.Generate(long_request(), timeout=60)
    async for _ in call:
        break
    call.cancel()
    assert await until_counted("CANCELLED", before) == before + 1
    assert handled("OK") == ok_before


async def test_a_generate_past_its_deadline_counts_as_deadline_exceeded(stub):
    before = handled("DEADLINE_EXCEEDED")
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        async for _ in stub.Generate(long_request(), timeout=0.3):
            pass
    assert failure.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert await until_counted("DEADLINE_EXCEEDED", before) == before + 1
