"""The public API as a client sees it: ListTools on ConveyorService, and
reflection (v1 and v1alpha) that serves conveyor.proto without the internal
services' files."""

from __future__ import annotations

import json

import grpc
from conveyor.v1 import common_pb2, conveyor_pb2
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2

from conveyor_common.server import stop_server


async def test_list_tools_shows_what_a_run_may_call(stub):
    tools = (await stub.ListTools(conveyor_pb2.ListToolsRequest(), timeout=10)).tools
    names = [t.name for t in tools]
    assert names == sorted(names) and {"python", "calculator", "database"} <= set(names)
    python = next(t for t in tools if t.name == "python")
    assert python.partial_mode == common_pb2.PARTIAL_MODE_PYTHON_STATEMENTS
    assert python.partial_safe and python.command_field == "code"
    assert "code" in json.loads(python.parameters_json_schema)["properties"]
    assert all(t.description for t in tools)


async def test_list_tools_without_a_gateway_is_unavailable():
    from conveyor.v1 import conveyor_pb2_grpc

    from scheduler.config import SchedulerConfig
    from scheduler.server import create_server

    config = SchedulerConfig(
        worker_target="127.0.0.1:1", gateway_target="127.0.0.1:1", connect_timeout=0.5
    )
    server, port = await create_server(config)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = conveyor_pb2_grpc.ConveyorServiceStub(channel)
            try:
                await stub.ListTools(conveyor_pb2.ListToolsRequest(), timeout=10)
            except grpc.aio.AioRpcError as e:
                assert e.code() == grpc.StatusCode.UNAVAILABLE and "tool_gateway" in e.details()
            else:
                raise AssertionError("ListTools answered without a gateway")
    finally:
        await stop_server(server, 0)


async def _reflect(target: str, service: str, request: reflection_pb2.ServerReflectionRequest):
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.stream_stream(
            f"/{service}/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        responses = [r async for r in call(iter([request]), timeout=10)]
    assert len(responses) == 1
    return responses[0]


async def test_reflection_v1_and_v1alpha_serve_the_public_files(scheduler):
    for service in (
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ):
        listed = await _reflect(
            scheduler, service, reflection_pb2.ServerReflectionRequest(list_services="")
        )
        names = {s.name for s in listed.list_services_response.service}
        assert {"conveyor.v1.ConveyorService", "grpc.reflection.v1.ServerReflection"} <= names
        found = await _reflect(
            scheduler,
            service,
            reflection_pb2.ServerReflectionRequest(
                file_containing_symbol="conveyor.v1.ConveyorService"
            ),
        )
        files = {}
        for raw in found.file_descriptor_response.file_descriptor_proto:
            proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
            files[proto.name] = proto
        public = files["conveyor/v1/conveyor.proto"]
        # A client of the public service needs conveyor.proto and common.proto only.
        assert list(public.dependency) == ["conveyor/v1/common.proto"]
        assert "ListTools" in [m.name for m in public.service[0].method]


async def test_the_readme_python_client_runs_as_written(scheduler):
    """The README's snippet, only its address changed, in a fresh process."""
    import asyncio
    import os
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text(encoding="utf-8")
    start = readme.index("```python\n", readme.index("A Python client")) + len("```python\n")
    code = readme[start : readme.index("```\n", start)]
    assert "localhost:50051" in code
    env = {**os.environ, "PYTHONPATH": f"{root / 'gen'}:{root}"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code.replace("localhost:50051", scheduler),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 240)
    assert proc.returncode == 0, err.decode()[-2000:]
    lines = out.decode().splitlines()
    assert lines[0].startswith("tools: ") and "python" in lines[0]
    assert any(line.startswith("run_finished") for line in lines), lines[-5:]


def _client_run(*tools: common_pb2.ToolSpec, forced: str = "") -> conveyor_pb2.RunRequest:
    return conveyor_pb2.RunRequest(
        messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="Weather?")],
        client_tools=list(tools),
        forced_completions=[forced] if forced else [],
        max_rounds=2,
    )


WEATHER = common_pb2.ToolSpec(
    name="get_weather", parameters_json_schema='{"type": "object", "properties": {}}'
)


async def test_a_client_tool_call_ends_the_run_for_the_client(stub):
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    events = [e async for e in stub.Run(_client_run(WEATHER, forced=call), timeout=60)]
    kinds = [e.WhichOneof("event") for e in events]
    (made,) = [e.client_tool_call for e in events if e.WhichOneof("event") == "client_tool_call"]
    assert made.tool_name == "get_weather" and json.loads(made.arguments_json) == {"city": "Oslo"}
    assert kinds.count("round_started") == 1  # no second round: the client runs the tool
    pieces = [
        e.client_tool_call_delta.arguments_delta
        for e in events
        if e.WhichOneof("event") == "client_tool_call_delta"
    ]
    assert len(pieces) > 1 and made.arguments_json.startswith("".join(pieces))
    assert events[-1].run_finished.finish_reason == common_pb2.FINISH_REASON_TOOL_CALLS
    assert "unit_dispatched" not in kinds  # nothing went to the gateway


async def test_bad_client_tools_are_invalid_arguments(stub):
    bad = [
        common_pb2.ToolSpec(name="python"),  # a hosted tool's name
        common_pb2.ToolSpec(name="has space"),
        common_pb2.ToolSpec(name="f", parameters_json_schema="[1]"),
        common_pb2.ToolSpec(name="f", parameters_json_schema="{nope"),
    ]
    for spec in bad:
        try:
            async for _ in stub.Run(_client_run(spec), timeout=30):
                pass
        except grpc.aio.AioRpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "client_tools[0]" in e.details()
        else:
            raise AssertionError(f"{spec} was accepted")
