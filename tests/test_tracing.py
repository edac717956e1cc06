"""OpenTelemetry: one trace per run across the three services, linked
through gRPC metadata, with units dispatched during decoding visible as
spans overlapping their round's generation; and --otlp-endpoint exporting a
real process's spans to an OTLP collector."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from concurrent import futures

import grpc
import pytest
from conveyor.v1 import common_pb2, conveyor_pb2, tool_gateway_pb2, tool_gateway_pb2_grpc
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from conveyor_common import tracing
from tests.test_integration import FILLER

# Statements the scheduler dispatches one by one while the model decodes.
# The long comment keeps the model writing after the first statements, for
# longer than a sandbox takes to start (~0.6 s here), so those statements
# run while the rest is still being written.
COMMENT = "# " + FILLER[:6000].replace("\n", " ") + "\n"
PROGRAM = f"```python\nimport time\nx = 6\n{COMMENT}y = x * 7\nprint(y)\n```\n"


@pytest.fixture
def spans():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use_provider(provider)
    yield exporter
    tracing.use_provider(None)
    provider.shutdown()


def _request(mode: int) -> conveyor_pb2.RunRequest:
    return conveyor_pb2.RunRequest(
        messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="Compute.")],
        tool_names=["python"],
        mode=mode,
        forced_completions=[PROGRAM + FILLER[:200], "It printed 42."],
        max_rounds=2,
    )


async def _trace_of(stub, exporter, mode: int) -> list:
    exporter.clear()
    events = [e async for e in stub.Run(_request(mode), timeout=120)]
    assert events[-1].run_finished.finish_reason == common_pb2.FINISH_REASON_FORCED_END
    # Server spans end just after the last response: wait for the Run's.
    for _ in range(100):
        if any(s.name == "conveyor.v1.ConveyorService/Run" for s in exporter.get_finished_spans()):
            break
        await asyncio.sleep(0.02)
    return list(exporter.get_finished_spans())


def _one(spans, name: str):
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, (name, [s.name for s in spans])
    return found[0]


def _parent(spans, span):
    return next(s for s in spans if s.context.span_id == span.parent.span_id)


async def test_a_run_is_one_trace_across_the_three_services(stub, spans):
    got = await _trace_of(stub, spans, conveyor_pb2.EXECUTION_MODE_PARTIAL)
    assert len({s.context.trace_id for s in got}) == 1
    run = _one(got, "conveyor.v1.ConveyorService/Run")
    assert run.parent is None and run.attributes["conveyor.mode"] == "partial"
    round0 = _one(got, "generate round 0")
    assert round0.parent.span_id == run.context.span_id
    # Each round's generation calls the worker: its Generate span is the round's child.
    generates = [s for s in got if s.name == "conveyor.v1.LlmWorkerService/Generate"]
    assert len(generates) == 2
    assert {_parent(got, g).name for g in generates} == {"generate round 0", "generate round 1"}
    assert all(g.kind == trace.SpanKind.SERVER for g in generates)
    assert generates[0].attributes["gen_ai.usage.output_tokens"] > 0
    # The gateway's stream, call and units hang below the scheduler's spans.
    execute = _one(got, "conveyor.v1.ToolGatewayService/Execute")
    assert _parent(got, execute).attributes[tracing.SERVICE_ATTRIBUTE] in (
        "scheduler",
        "conveyor.v1.ConveyorService",
    )
    gateway_call = next(
        s
        for s in got
        if s.name == "tool_call python"
        and s.attributes[tracing.SERVICE_ATTRIBUTE] == "tool_gateway"
    )
    assert gateway_call.parent.span_id == execute.context.span_id
    gateway_units = [
        s
        for s in got
        if s.name.startswith("unit ") and s.attributes[tracing.SERVICE_ATTRIBUTE] == "tool_gateway"
    ]
    assert len(gateway_units) >= 3
    assert all(u.parent.span_id == gateway_call.context.span_id for u in gateway_units)
    # The scheduler's own call and unit spans: units were dispatched, and
    # ran, while round 0 was still decoding.
    units = [
        s
        for s in got
        if s.name.startswith("unit ") and s.attributes[tracing.SERVICE_ATTRIBUTE] == "scheduler"
    ]
    assert len(units) == len(gateway_units)
    assert all(_parent(got, u).name == "tool_call python" for u in units)
    overlapping = [u for u in units if round0.start_time < u.start_time < round0.end_time]
    assert len(overlapping) >= 2, [(u.start_time, round0.end_time) for u in units]
    assert all(u.attributes["conveyor.during_decode"] for u in overlapping)
    # ... and on the gateway a unit ran start to end while the model decoded.
    assert any(
        round0.start_time < u.start_time < u.end_time < round0.end_time for u in gateway_units
    )


def _units(spans, service: str) -> list:
    return [
        s
        for s in spans
        if s.name.startswith("unit ") and s.attributes[tracing.SERVICE_ATTRIBUTE] == service
    ]


async def test_the_modes_differ_in_when_the_gateway_starts_a_unit(stub, spans):
    """Partial: the gateway runs unit 0 before the model has written the
    last unit. Sequential: the call's units are held until it closes, so
    the gateway starts none before the scheduler has sent them all."""
    for mode, before_the_last in (
        (conveyor_pb2.EXECUTION_MODE_PARTIAL, True),
        (conveyor_pb2.EXECUTION_MODE_SEQUENTIAL, False),
    ):
        got = await _trace_of(stub, spans, mode)
        first_run = min(u.start_time for u in _units(got, "tool_gateway"))
        last_sent = max(u.start_time for u in _units(got, "scheduler"))
        assert (first_run < last_sent) is before_the_last, mode


async def test_a_callers_trace_is_continued(stub, spans):
    caller = spans  # the same exporter holds the caller's span
    with tracing.tracer().start_as_current_span("client") as parent:
        events = [
            e
            async for e in stub.Run(
                _request(conveyor_pb2.EXECUTION_MODE_PARTIAL),
                timeout=120,
                metadata=tracing.inject(),
            )
        ]
    assert events[-1].WhichOneof("event") == "run_finished"
    await asyncio.sleep(0.1)
    run = _one(caller.get_finished_spans(), "conveyor.v1.ConveyorService/Run")
    assert run.context.trace_id == parent.get_span_context().trace_id
    assert run.parent.span_id == parent.get_span_context().span_id


class _Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver: what a collector does, minus the forwarding."""

    def __init__(self):
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []

    def Export(self, request, context):
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_otlp_endpoint_exports_a_process_spans_to_a_collector():
    collector = _Collector()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    otlp_port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    port = _free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tool_gateway",
        "--port",
        str(port),
        "--metrics-port",
        "0",
        "--otlp-endpoint",
        f"http://127.0.0.1:{otlp_port}",
        env={**os.environ, "LOG_FORMAT": "json"},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        with tracing.tracer().start_as_current_span("client"):
            pass
        trace_id = "0af7651916cd43dd8448eb211c80319c"
        traceparent = f"00-{trace_id}-b7ad6b7169203331-01"
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await asyncio.wait_for(channel.channel_ready(), 30)
            stub = tool_gateway_pb2_grpc.ToolGatewayServiceStub(channel)
            await stub.ListTools(
                tool_gateway_pb2.ToolGatewayServiceListToolsRequest(),
                timeout=10,
                metadata=(("traceparent", traceparent),),
                wait_for_ready=True,
            )
        process.send_signal(signal.SIGTERM)  # stopping flushes the batch
        assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        if process.returncode is None:
            process.kill()
        server.stop(0)
    spans = [
        (resource.resource, span)
        for request in collector.requests
        for resource in request.resource_spans
        for scope in resource.scope_spans
        for span in scope.spans
    ]
    listed = [(r, s) for r, s in spans if s.name == "conveyor.v1.ToolGatewayService/ListTools"]
    assert len(listed) == 1, [s.name for _, s in spans]
    resource, span = listed[0]
    assert span.trace_id.hex() == trace_id and span.parent_span_id.hex() == "b7ad6b7169203331"
    names = {a.key: a.value.string_value for a in resource.attributes}
    assert names["service.name"] == "tool_gateway"
