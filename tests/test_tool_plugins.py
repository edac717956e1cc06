"""Tools from outside the gateway's code: a YAML file mapping function specs
to Python or HTTP handlers, and Python entry points; through the gRPC API."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest
from conveyor.v1 import common_pb2, tool_gateway_pb2, tool_gateway_pb2_grpc

from conveyor_common.server import stop_server
from tests.test_gateway import Stream, last, results
from tool_gateway.config import GatewayConfig
from tool_gateway.plugins import PluginError, entry_point_tools, file_tools
from tool_gateway.registry import ToolRegistry, build_registry
from tool_gateway.server import create_server

pb = tool_gateway_pb2


class _Handler(BaseHTTPRequestHandler):
    """A tool service on loopback: JSON answers, a plain-text one, a 500."""

    def do_POST(self):  # noqa: N802 (the stdlib's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if "fail" in body["text"]:
            self.send_response(500)
            self.end_headers()
            self.wfile.write(b"upstream exploded")
            return
        if body["text"] == "plain":
            payload, kind = b"just text", "text/plain"
        else:
            answer = {"ok": True, "value": f"{body['tool']}#{body['index']}:{body['text'][::-1]}"}
            if body["text"] == "doomed":
                answer = {"ok": False, "verdict": {"reason": "no such city", "field": "city"}}
            payload, kind = json.dumps(answer).encode(), "application/json"
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):  # keep test output quiet
        pass


@pytest.fixture(scope="module")
def http_service():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/unit"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def tools_file(tmp_path_factory, http_service):
    path = tmp_path_factory.mktemp("tools") / "tools.yaml"
    path.write_text(
        f"""
tools:
  - type: function
    function:
      name: shout
      description: Upper-cases each line.
      parameters: {{type: object, properties: {{text: {{type: string}}}}}}
    partial_mode: LINES
    partial_safe: true
    command_field: text
    handler: {{python: "tests.plugin_handlers:shout"}}
  - function:
      name: order
      description: Places an order.
      parameters:
        type: object
        properties: {{quantity: {{type: integer}}, price: {{type: number}}}}
    partial_mode: JSON_FIELDS
    handler: {{python: "tests.plugin_handlers:positive"}}
  - function: {{name: broken, description: Always fails.}}
    handler: {{python: "tests.plugin_handlers:broken"}}
  - function: {{name: weather, description: Weather by city.}}
    partial_mode: partial_mode_lines
    handler: {{http: "{http_service}", timeout_seconds: 5}}
""",
        encoding="utf-8",
    )
    return path


@pytest.fixture(scope="module")
async def stub(tools_file):
    server, port = await create_server(
        GatewayConfig(), "127.0.0.1", 0, registry=ToolRegistry(file_tools(tools_file))
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield tool_gateway_pb2_grpc.ToolGatewayServiceStub(channel)
    await stop_server(server, 0)


async def test_list_tools_shows_the_file_tools_as_declared(stub):
    tools = {
        t.name: t for t in (await stub.ListTools(pb.ToolGatewayServiceListToolsRequest())).tools
    }
    assert set(tools) == {"shout", "order", "broken", "weather"}
    assert tools["shout"].partial_mode == common_pb2.PARTIAL_MODE_LINES
    assert tools["shout"].partial_safe and tools["shout"].command_field == "text"
    assert tools["order"].partial_mode == common_pb2.PARTIAL_MODE_JSON_FIELDS
    assert not tools["order"].partial_safe
    assert (
        json.loads(tools["order"].parameters_json_schema)["properties"]["quantity"]["type"]
        == "integer"
    )
    assert tools["weather"].partial_mode == common_pb2.PARTIAL_MODE_LINES


async def test_a_python_handler_runs_each_unit_with_session_state(stub):
    stream = Stream(stub)
    stream.open("c1", tool="shout", session_key="run-1")
    stream.units("c1", "hello", "world")
    stream.close("c1", 2)
    events = await stream.wait("c1")
    assert [r.value for r in results(events)] == ["1:HELLO", "2:WORLD"]
    assert last(events).call_result.ok and last(events).call_result.output == "1:HELLO\n2:WORLD"
    await stream.end()


async def test_a_handler_verdict_aborts_the_call(stub):
    stream = Stream(stub)
    stream.open("o1", tool="order")
    stream.send("o1", unit=pb.CommandUnit(index=0, text="3", field="quantity"))
    stream.send("o1", unit=pb.CommandUnit(index=1, text="-2.5", field="price"))
    stream.send("o1", unit=pb.CommandUnit(index=2, text="1", field="extra"))
    stream.close("o1", 3)
    events = await stream.wait("o1")
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds.count("unit_result") == 2  # the unit after the verdict never ran
    verdict = next(e.abort_verdict for e in events if e.WhichOneof("event") == "abort_verdict")
    assert verdict.field == "price" and verdict.unit_index == 1
    assert "must be positive" in verdict.reason
    assert not last(events).call_result.ok and "price" in last(events).call_result.output
    await stream.end()


async def test_a_failing_handler_fails_its_unit_and_the_stream_goes_on(stub):
    stream = Stream(stub)
    stream.open("b1", tool="broken")
    stream.units("b1", "anything")
    stream.close("b1", 1)
    events = await stream.wait("b1")
    (result,) = results(events)
    assert not result.ok and "ValueError: the handler broke" in result.exception
    assert not last(events).call_result.ok
    stream.open("c2", tool="shout")
    stream.units("c2", "after")
    stream.close("c2", 1)
    assert results(await stream.wait("c2"))[0].value == "1:AFTER"
    await stream.end()


async def test_an_http_handler_gets_each_unit_posted(stub):
    stream = Stream(stub)
    stream.open("w1", tool="weather")
    stream.units("w1", "paris", "plain", "fail now")
    stream.close("w1", 3)
    events = await stream.wait("w1")
    ok, plain, failed = results(events)
    assert ok.ok and ok.value == "weather#0:sirap"
    assert plain.ok and plain.value == "just text"
    assert not failed.ok and "HTTP 500" in failed.exception and "exploded" in failed.exception
    stream.open("w2", tool="weather")
    stream.units("w2", "doomed")
    stream.close("w2", 1)
    events = await stream.wait("w2")
    assert any(e.WhichOneof("event") == "abort_verdict" for e in events)
    await stream.end()


def test_bad_tools_files_name_the_tool_and_the_problem(tmp_path):
    cases = {
        "tools: {}": "top-level 'tools:' list",
        "tools: [{function: {description: x}, handler: {python: 'a:b'}}]": "name' is required",
        "tools: [{function: {name: t}, partial_mode: SIDEWAYS, handler: {python: 'a:b'}}]": (
            "unknown partial_mode 'SIDEWAYS'"
        ),
        "tools: [{function: {name: t}}]": "exactly one of 'python' or 'http'",
        "tools: [{function: {name: t}, handler: {python: 'no_such_module_x:f'}}]": (
            "No module named 'no_such_module_x'"
        ),
        "tools: [{function: {name: t}, handler: {python: 'json'}}]": "package.module:function",
        "tools: [": "tools file",
    }
    for text, message in cases.items():
        path = tmp_path / "bad.yaml"
        path.write_text(text, encoding="utf-8")
        with pytest.raises(PluginError, match=message.replace("(", r"\(")):
            file_tools(path)


def _install_entry_point(tmp_path, monkeypatch, value: str) -> None:
    """A distribution on sys.path whose entry point names `value`, as
    `pip install` of a tool package leaves one."""
    dist = tmp_path / "conveyor_test_tools-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: conveyor-test-tools\nVersion: 1.0\n"
    )
    (dist / "entry_points.txt").write_text(f"[conveyor.tools]\nthe_tool = {value}\n")
    monkeypatch.syspath_prepend(str(tmp_path))


async def test_entry_point_tools_join_the_built_ins(tmp_path, monkeypatch):
    _install_entry_point(tmp_path, monkeypatch, "tests.plugin_handlers:EchoTool")
    assert [t.spec.name for t in await entry_point_tools(GatewayConfig())] == ["echo_ep"]
    registry = await build_registry(GatewayConfig())
    assert "echo_ep" in registry.names() and "python" in registry.names()


async def test_a_broken_entry_point_stops_the_gateway_with_its_name(tmp_path, monkeypatch):
    _install_entry_point(tmp_path, monkeypatch, "tests.plugin_handlers:shout")
    with pytest.raises(PluginError, match="the_tool"):
        await entry_point_tools(GatewayConfig())
