"""The scheduler's public edge against hostile or broken input: bad requests
are INVALID_ARGUMENT naming the field, a down worker or gateway ends the run
fast with a clear reason, a restarted gateway loses no call that had not
started, and every run's end (a cancel too) is counted and logged."""

from __future__ import annotations

import asyncio
import socket
import time

import grpc
import pytest
from conveyor.v1 import common_pb2, conveyor_pb2, conveyor_pb2_grpc
from prometheus_client import REGISTRY

from conveyor_common.server import stop_server
from tests.test_integration import (
    FILLER,
    collect,
    run_request,
)
from tool_gateway.config import GatewayConfig

PARTIAL = conveyor_pb2.EXECUTION_MODE_PARTIAL
QUICK = "```python\nprint(6 * 7)\n```\n"


async def status_of(stub, request) -> tuple[grpc.StatusCode, str]:
    try:
        await collect(stub, request)
    except grpc.aio.AioRpcError as e:
        return e.code(), e.details()
    return grpc.StatusCode.OK, ""


def user(text: str) -> common_pb2.ChatMessage:
    return common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=text)


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"mode": 77}, "mode"),
        ({"envelopes": [99]}, "envelopes"),
        ({"envelopes": [conveyor_pb2.ENVELOPE_UNSPECIFIED]}, "envelopes"),
        ({"max_rounds": 2**32 - 1}, "max_rounds"),
        ({"abort_retries": 2**32 - 1}, "abort_retries"),
        ({"run_id": "r" * (1 << 20)}, "run_id"),
        ({"run_id": "has spaces\nand a newline"}, "run_id"),
        ({"tool_names": ["python"] * 1000}, "tool_names"),
        ({"sampling": common_pb2.SamplingParams(temperature=float("nan"))}, "temperature"),
        ({"forced_completions": ["x"] * 100}, "forced_completions"),
    ],
)
async def test_loose_fields_are_rejected_naming_the_field(stub, fields, named):
    request = conveyor_pb2.RunRequest(messages=[user("hi")], **fields)
    code, details = await status_of(stub, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert named in details


async def test_malformed_protobuf_is_invalid_argument(scheduler):
    async with grpc.aio.insecure_channel(scheduler) as channel:
        run = channel.unary_stream(
            "/conveyor.v1.ConveyorService/Run",
            request_serializer=lambda raw: raw,
            response_deserializer=lambda raw: raw,
        )
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            async for _ in run(b"\xff\xff\xff\xff", timeout=10):
                pass
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_request_over_the_size_cap_is_refused(stub):
    from scheduler.config import SchedulerConfig

    too_big = "x" * (SchedulerConfig().max_request_bytes + 1)
    code, _ = await status_of(stub, conveyor_pb2.RunRequest(messages=[user(too_big)]))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_a_prompt_over_the_context_fails_before_the_run_starts(stub, worker):
    engine, _ = worker
    words = " hello" * (engine.max_context + 10)  # a token per word at least
    request = conveyor_pb2.RunRequest(messages=[user(words)], max_rounds=1)
    events = []
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        async for event in stub.Run(request, timeout=60):
            events.append(event)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "context" in failure.value.details()
    assert events == []  # not RoundStarted, not RunFinished: the run never started


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
async def scheduler_on(worker):
    """Makes a scheduler stub for given worker and gateway targets."""
    from scheduler.config import SchedulerConfig
    from scheduler.server import create_server

    servers = []

    async def make(worker_target: str, gateway_target: str, **config):
        server, port = await create_server(
            SchedulerConfig(worker_target=worker_target, gateway_target=gateway_target, **config)
        )
        servers.append(server)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        servers.append(channel)
        return conveyor_pb2_grpc.ConveyorServiceStub(channel)

    yield make
    for item in servers:
        if isinstance(item, grpc.aio.Channel):
            await item.close()
        else:
            await stop_server(item, 0)


async def test_a_run_with_the_worker_down_fails_fast(scheduler_on, gateway):
    stub = await scheduler_on(f"127.0.0.1:{free_port()}", gateway, connect_timeout=1.0)
    start = time.monotonic()
    events = [e async for e in stub.Run(run_request([QUICK], PARTIAL), timeout=60)]
    took = time.monotonic() - start
    finished = events[-1].run_finished
    assert finished.finish_reason == common_pb2.FINISH_REASON_ERROR
    assert "llm_worker" in finished.message and "UNAVAILABLE" in finished.message
    assert took < 30  # the connect timeout, not the client's 60 s deadline


async def test_a_run_with_the_gateway_down_fails_fast(scheduler_on, worker):
    _, worker_target = worker
    stub = await scheduler_on(worker_target, f"127.0.0.1:{free_port()}", connect_timeout=1.0)
    start = time.monotonic()
    events = [e async for e in stub.Run(run_request([QUICK], PARTIAL), timeout=60)]
    finished = events[-1].run_finished
    assert finished.finish_reason == common_pb2.FINISH_REASON_ERROR
    assert "tool_gateway" in finished.message and "UNAVAILABLE" in finished.message
    assert time.monotonic() - start < 30


async def test_the_first_run_after_a_gateway_restart_keeps_its_call(scheduler_on, worker):
    from tool_gateway.server import create_server as create_gateway

    _, worker_target = worker
    port = free_port()
    config = GatewayConfig(unit_timeout=20.0)
    gateway, _ = await create_gateway(config, "127.0.0.1", port)
    stub = await scheduler_on(worker_target, f"127.0.0.1:{port}")
    try:
        first = await collect(stub, run_request([QUICK, "ok"], PARTIAL))
        assert _outputs(first) == ["42"]
        await stop_server(gateway, 0)
        gateway, _ = await create_gateway(config, "127.0.0.1", port)
        again = await collect(stub, run_request([QUICK, "ok"], PARTIAL))
        assert _outputs(again) == ["42"], again[-1].run_finished
    finally:
        await stop_server(gateway, 0)


def _outputs(events) -> list[str]:
    out = []
    for e in events:
        if e.WhichOneof("event") == "tool_call_finished":
            f = e.tool_call_finished
            out.append(f.result.output if f.WhichOneof("outcome") == "result" else f.error.message)
    return out


def _sample(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_a_cancelled_run_is_counted_and_logged(stub, capsys):
    runs = ("conveyor_scheduler_runs_total", {"mode": "partial", "reason": "CANCELLED"})
    handled = (
        "grpc_server_handled_total",
        {"grpc_service": "conveyor.v1.ConveyorService", "grpc_method": "Run",
         "grpc_code": "CANCELLED"},
    )  # fmt: skip
    before = _sample(runs[0], **runs[1]), _sample(handled[0], **handled[1])
    call = stub.Run(run_request([QUICK + FILLER * 4], PARTIAL), timeout=60)
    async for event in call:
        if event.WhichOneof("event") == "token_delta":
            break
    call.cancel()
    for _ in range(100):
        after = _sample(runs[0], **runs[1]), _sample(handled[0], **handled[1])
        if after[0] > before[0] and after[1] > before[1]:
            break
        await asyncio.sleep(0.05)
    assert after[0] == before[0] + 1, "the cancelled run is not in conveyor_scheduler_runs_total"
    assert after[1] == before[1] + 1, "grpc_server_handled_total did not count CANCELLED"
    out = capsys.readouterr()
    assert "run done" in out.out + out.err and "CANCELLED" in out.out + out.err


async def test_a_deadline_is_counted_as_deadline_exceeded(stub):
    labels = {"grpc_service": "conveyor.v1.ConveyorService", "grpc_method": "Run",
              "grpc_code": "DEADLINE_EXCEEDED"}  # fmt: skip
    before = _sample("grpc_server_handled_total", **labels)
    with pytest.raises(grpc.aio.AioRpcError):
        await collect_with_timeout(stub, run_request([QUICK + FILLER * 8], PARTIAL), 0.5)
    for _ in range(100):
        if _sample("grpc_server_handled_total", **labels) > before:
            break
        await asyncio.sleep(0.05)
    assert _sample("grpc_server_handled_total", **labels) == before + 1


async def collect_with_timeout(stub, request, timeout: float):
    return [r async for r in stub.Run(request, timeout=timeout)]


async def test_a_tool_result_longer_than_the_context_does_not_end_the_run(stub):
    huge = "```python\nprint('ab ' * 40000)\n```\n"  # 120 KB printed, 64 KiB kept
    events = await collect(stub, run_request([huge, "done"], PARTIAL))
    finished = events[-1].run_finished
    assert finished.finish_reason == common_pb2.FINISH_REASON_FORCED_END, finished.message
    assert finished.timing.rounds == 2  # the model read the (cut) result and answered
