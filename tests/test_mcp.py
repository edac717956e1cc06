"""MCP both ways, against real servers (no mocks): the gateway hosts the
tools of mcp-server-time and mcp-server-git over stdio and of a server
written with the SDK over streamable HTTP; a Run whose forced output calls
them gives the same results in both modes; progress, cancel, a dying
server and timeouts; and the gateway's own tools served over MCP, driven by
the SDK's client."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from conveyor.v1 import (
    common_pb2,
    conveyor_pb2,
    conveyor_pb2_grpc,
    tool_gateway_pb2,
    tool_gateway_pb2_grpc,
)

from conveyor_common.server import stop_server
from tests.mcp_servers import sdk_server
from tests.test_integration import FILLER

HEADER_ENV = "CONVEYOR_TEST_MCP_HEADER"
COMMIT_MESSAGE = "the commit the test made"


def _tool_call(name: str, arguments: dict) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>\n"


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("repo")
    git = ["git", "-C", str(path), "-c", "user.email=t@example.com", "-c", "user.name=Test"]
    subprocess.run([*git, "init", "-q"], check=True)
    (path / "README").write_text("hello\n")
    subprocess.run([*git, "add", "README"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", COMMIT_MESSAGE], check=True)
    return path


@pytest.fixture(scope="module")
async def http_mcp():
    """The SDK-written server over streamable HTTP, wanting a header."""
    sdk_server.REQUIRED_HEADER.update({"x-test-token": "a-header-value"})
    server, task, port = await sdk_server.serve_http()
    yield f"http://127.0.0.1:{port}/mcp"
    server.should_exit = True
    await task


@pytest.fixture(scope="module")
def tools_file(tmp_path_factory, repo, http_mcp) -> Path:
    python = sys.executable
    events = tmp_path_factory.mktemp("events") / "stdio-events"
    doc = {
        "mcp_servers": [
            {
                "name": "time",
                "command": python,
                "args": ["-m", "mcp_server_time", "--local-timezone", "UTC"],
            },
            {
                "name": "git",
                "command": python,
                "args": ["-m", "mcp_server_git", "-r", str(repo)],
                "tools": {
                    "git_log": {"partial_safe": True},
                    "git_show": {
                        "partial_mode": "JSON_FIELDS",
                        "partial_safe": True,
                        "handler": "tests.mcp_servers.handlers:show_revision",
                    },
                },
            },
            {
                "name": "sdk-http",
                "url": http_mcp,
                "headers": {"x-test-token": "${" + HEADER_ENV + "}"},
            },
            {
                "name": "sdk-stdio",
                "command": python,
                "args": ["-m", "tests.mcp_servers.sdk_server"],
                "env": {"SDK_SERVER_EVENTS": str(events), "PYTHONPATH": str(Path.cwd())},
                "prefix": "local_",
                "timeout_seconds": 2,
            },
        ]
    }
    path = tmp_path_factory.mktemp("tools") / "tools.yaml"
    path.write_text(json.dumps(doc))  # JSON is YAML
    return path


@pytest.fixture(scope="module")
async def mcp_gateway(tools_file, monkeypatch_module):
    from tool_gateway.config import GatewayConfig
    from tool_gateway.server import create_server

    monkeypatch_module.setenv(HEADER_ENV, "a-header-value")
    config = GatewayConfig(unit_timeout=20.0, tools_file=str(tools_file))
    server, port = await create_server(config, "127.0.0.1", 0)
    yield f"127.0.0.1:{port}"
    await stop_server(server, 0)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
async def mcp_stub(worker, mcp_gateway):
    from scheduler.config import SchedulerConfig
    from scheduler.server import create_server

    _, worker_target = worker
    server, port = await create_server(
        SchedulerConfig(worker_target=worker_target, gateway_target=mcp_gateway)
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield conveyor_pb2_grpc.ConveyorServiceStub(channel)
    await stop_server(server, 0)


async def test_the_gateway_lists_every_mcp_servers_tools_with_their_schemas(mcp_gateway):
    async with grpc.aio.insecure_channel(mcp_gateway) as channel:
        stub = tool_gateway_pb2_grpc.ToolGatewayServiceStub(channel)
        listed = await stub.ListTools(tool_gateway_pb2.ToolGatewayServiceListToolsRequest())
    tools = {t.name: t for t in listed.tools}
    assert {"get_current_time", "convert_time", "git_status", "git_log"} <= set(tools)
    assert {"slow_count", "sleeper", "echo", "local_echo", "local_die"} <= set(tools)
    convert = json.loads(tools["convert_time"].parameters_json_schema)
    assert {"source_timezone", "time", "target_timezone"} <= set(convert["required"])
    assert tools["git_log"].partial_mode == common_pb2.PARTIAL_MODE_WHOLE
    assert tools["git_log"].partial_safe and not tools["git_status"].partial_safe
    assert "python" in tools  # beside the built-in tools


def _run(calls: str, mode: int, tools: list[str]) -> conveyor_pb2.RunRequest:
    return conveyor_pb2.RunRequest(
        messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="Look it up.")],
        tool_names=tools,
        mode=mode,
        forced_completions=["Let me check.\n" + calls + FILLER[:1500], "Done."],
        max_rounds=2,
    )


def _outcomes(events) -> dict[str, tuple[bool, str]]:
    """Each call's (ok, output or error), by tool name."""
    names, out = {}, {}
    for e in events:
        if e.HasField("tool_call_started"):
            names[e.tool_call_started.call_id] = e.tool_call_started.tool_name
        elif e.HasField("tool_call_finished"):
            f = e.tool_call_finished
            ok = f.WhichOneof("outcome") == "result" and f.result.ok
            out[names[f.call_id]] = (ok, f.result.output if ok else f.error.message)
    return out


async def test_a_run_calls_mcp_tools_with_the_same_results_in_both_modes(mcp_stub, repo):
    calls = _tool_call(
        "convert_time",
        {"source_timezone": "UTC", "time": "12:00", "target_timezone": "Asia/Tokyo"},
    ) + _tool_call("git_log", {"repo_path": str(repo), "max_count": 1})
    results = {}
    for mode in (conveyor_pb2.EXECUTION_MODE_PARTIAL, conveyor_pb2.EXECUTION_MODE_SEQUENTIAL):
        events = [
            e
            async for e in mcp_stub.Run(_run(calls, mode, ["convert_time", "git_log"]), timeout=120)
        ]
        finished = events[-1].run_finished
        assert finished.finish_reason == common_pb2.FINISH_REASON_FORCED_END, finished.message
        results[mode] = _outcomes(events)
        dispatched = [e.unit_dispatched for e in events if e.HasField("unit_dispatched")]
        assert len(dispatched) == 2
        # Each call went out the moment it was written, while the model wrote on.
        assert all(d.during_decode for d in dispatched)
    partial, sequential = results.values()
    assert partial == sequential
    ok, converted = partial["convert_time"]
    assert ok and "+09:00" in converted and "21:00" in converted
    ok, log = partial["git_log"]
    assert ok and COMMIT_MESSAGE in log


async def test_a_field_handler_maps_each_argument_to_its_own_mcp_call(mcp_stub, repo):
    """git_show as JSON_FIELDS: `repo_path` makes no call; `revision` makes
    one the moment the model has written it, before the call is closed."""
    call = _tool_call("git_show", {"repo_path": str(repo), "revision": "HEAD"})
    for mode in (conveyor_pb2.EXECUTION_MODE_PARTIAL, conveyor_pb2.EXECUTION_MODE_SEQUENTIAL):
        events = [e async for e in mcp_stub.Run(_run(call, mode, ["git_show"]), timeout=120)]
        units = [e.unit_dispatched for e in events if e.HasField("unit_dispatched")]
        assert [u.field for u in units] == ["repo_path", "revision"]
        ok, shown = _outcomes(events)["git_show"]
        assert ok and COMMIT_MESSAGE in shown


async def test_mcp_progress_becomes_unit_progress(mcp_stub):
    calls = _tool_call("slow_count", {"n": 3, "delay": 0.05})
    events = [
        e
        async for e in mcp_stub.Run(
            _run(calls, conveyor_pb2.EXECUTION_MODE_PARTIAL, ["slow_count"]), timeout=120
        )
    ]
    progress = [e.unit_progress.progress.stdout for e in events if e.HasField("unit_progress")]
    assert progress == [f"[progress {i}/3] step {i}\n" for i in (1, 2, 3)]
    assert _outcomes(events)["slow_count"] == (True, "counted to 3")


async def test_a_cancelled_run_cancels_its_mcp_call(mcp_stub):
    sdk_server.EVENTS.clear()
    call = mcp_stub.Run(
        _run(
            _tool_call("sleeper", {"seconds": 60}), conveyor_pb2.EXECUTION_MODE_PARTIAL, ["sleeper"]
        ),
        timeout=120,
    )
    async for event in call:
        if event.HasField("unit_dispatched"):
            break
    for _ in range(100):
        if "sleeper started" in sdk_server.EVENTS:
            break
        await asyncio.sleep(0.05)
    call.cancel()
    for _ in range(100):
        if "sleeper cancelled" in sdk_server.EVENTS:
            break
        await asyncio.sleep(0.05)
    assert sdk_server.EVENTS[:2] == ["sleeper started", "sleeper cancelled"]


async def _execute(gateway: str, tool: str, arguments: dict) -> list:
    """One call on the gateway's Execute stream; its events."""
    async with grpc.aio.insecure_channel(gateway) as channel:
        stub = tool_gateway_pb2_grpc.ToolGatewayServiceStub(channel)
        text = json.dumps(arguments)
        requests = [
            tool_gateway_pb2.ExecuteRequest(
                call_id="c", open=tool_gateway_pb2.OpenCall(tool_name=tool, run_id="r")
            ),
            tool_gateway_pb2.ExecuteRequest(
                call_id="c", unit=tool_gateway_pb2.CommandUnit(index=0, text=text)
            ),
            tool_gateway_pb2.ExecuteRequest(
                call_id="c", close=tool_gateway_pb2.CloseCall(full_text=text, unit_count=1)
            ),
        ]
        return [r async for r in stub.Execute(iter(requests), timeout=60)]


def _last(events):
    last = events[-1]
    kind = last.WhichOneof("event")
    return kind, getattr(last, kind)


async def test_a_dying_server_fails_its_call_and_is_restarted_for_the_next(mcp_gateway):
    kind, first = _last(await _execute(mcp_gateway, "local_echo", {"text": "one"}))
    assert kind == "call_result" and first.ok
    kind, error = _last(await _execute(mcp_gateway, "local_die", {}))
    assert kind == "error" and "sdk-stdio" in error.message and "restarted" in error.message
    kind, again = _last(await _execute(mcp_gateway, "local_echo", {"text": "two"}))
    assert kind == "call_result" and again.ok and again.output.startswith("two (pid ")
    assert again.output.split("pid ")[1] != first.output.split("pid ")[1]  # a new process


async def test_a_call_past_the_servers_timeout_fails_timeout(mcp_gateway):
    kind, error = _last(await _execute(mcp_gateway, "local_sleeper", {"seconds": 30}))
    assert kind == "error" and error.code == common_pb2.TOOL_ERROR_CODE_TIMEOUT
    assert "2 s timeout" in error.message


async def test_an_mcp_server_that_cannot_start_stops_the_gateway(tmp_path):
    from tool_gateway.config import GatewayConfig
    from tool_gateway.plugins import PluginError
    from tool_gateway.server import create_server

    path = tmp_path / "tools.yaml"
    path.write_text(
        json.dumps(
            {
                "mcp_servers": [
                    {
                        "name": "nope",
                        "command": sys.executable,
                        "args": ["-c", "import sys; sys.exit(1)"],
                    }
                ]
            }
        )
    )
    with pytest.raises(PluginError, match="nope"):
        await create_server(GatewayConfig(tools_file=str(path)), "127.0.0.1", 0)


# ---- the gateway's own tools over MCP ----------------------------------------------------


@pytest.fixture(scope="module")
async def served(tmp_path_factory):
    """(MCP URL, token) of a gateway serving its tools over MCP with tokens."""
    from conveyor_common import certs
    from conveyor_common.security import ServerSecurity, TokenSet
    from tool_gateway.config import GatewayConfig
    from tool_gateway.server import create_server, mcp_port

    token = certs.new_token()
    path = tmp_path_factory.mktemp("mcp-tokens") / "tokens"
    path.write_text(token + "\n")
    config = GatewayConfig(
        unit_timeout=20.0, mcp_port=0, security=ServerSecurity(tokens=TokenSet(str(path)))
    )
    server, _ = await create_server(config, "127.0.0.1", 0)
    yield f"http://127.0.0.1:{mcp_port(server)}/mcp", token
    await stop_server(server, 0)


def _client(url: str, token: str | None):
    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    http = httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30.0, read=120.0))
    return http, Client(streamable_http_client(url, http_client=http), mode="legacy")


async def test_the_gateways_tools_over_mcp_share_a_session_per_mcp_session(served):
    url, token = served
    http, client = _client(url, token)
    async with http, client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        assert {"python", "search", "database", "calculator"} <= set(tools)
        assert "code" in tools["python"].input_schema["properties"]
        first = await client.call_tool("python", {"code": "x = 6\nprint(x * 7)\n"})
        assert not first.is_error and "42" in first.content[0].text
        # The same MCP session keeps the interpreter: x is still there.
        second = await client.call_tool("python", {"code": "print(x + 1)\n"})
        assert "7" in second.content[0].text
        calc = await client.call_tool("calculator", {"expression": "2**10\n3*3"})
        assert "1024" in calc.content[0].text and "9" in calc.content[0].text
        db = await client.call_tool("database", {"sql": "SELECT 1 + 1 AS two;"})
        assert not db.is_error and "2" in db.content[0].text
        bad = await client.call_tool("calculator", {"expression": 5})
        assert bad.is_error and "invalid arguments" in bad.content[0].text
        failed = await client.call_tool("python", {"code": "1 / 0\n"})
        assert failed.is_error and "ZeroDivisionError" in failed.content[0].text
    # A new session does not see the old one's variables.
    http, client = _client(url, token)
    async with http, client:
        fresh = await client.call_tool("python", {"code": "print('x' in globals())\n"})
        assert "False" in fresh.content[0].text


async def test_the_mcp_port_wants_the_gateways_token(served):
    import httpx2

    url, _ = served
    async with httpx2.AsyncClient() as http:
        refused = await http.post(url, json={"jsonrpc": "2.0", "id": 1, "method": "ping"})
        wrong = await http.post(
            url,
            json={"jsonrpc": "2.0", "id": 1, "method": "ping"},
            headers={"Authorization": "Bearer " + "0" * 64},
        )
    assert refused.status_code == 401 and wrong.status_code == 401
    assert refused.headers["www-authenticate"].startswith("Bearer")


async def test_a_stateless_client_cannot_pick_another_sessions_interpreter(served):
    """On MCP's stateless protocol a client's own Mcp-Session-Id header
    names nothing: its call gets a fresh interpreter, not that session's."""
    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    url, token = served
    seen_ids: set[str] = set()

    async def remember(response):
        if "mcp-session-id" in response.headers:
            seen_ids.add(response.headers["mcp-session-id"])

    http = httpx2.AsyncClient(
        headers={"Authorization": f"Bearer {token}"}, event_hooks={"response": [remember]}
    )
    owner = Client(streamable_http_client(url, http_client=http), mode="legacy")
    async with http, owner:
        await owner.call_tool("python", {"code": "secret = 'kept'\n"})
        assert len(seen_ids) == 1
        session_id = seen_ids.pop()
        forged = httpx2.AsyncClient(
            headers={"Authorization": f"Bearer {token}", "Mcp-Session-Id": str(session_id)}
        )
        async with forged, Client(streamable_http_client(url, http_client=forged)) as intruder:
            seen = await intruder.call_tool("python", {"code": "print('secret' in globals())\n"})
        assert "False" in seen.content[0].text
        mine = await owner.call_tool("python", {"code": "print(secret)\n"})
        assert "kept" in mine.content[0].text


async def test_a_server_that_died_while_idle_is_restarted_for_the_next_call(mcp_gateway):
    kind, first = _last(await _execute(mcp_gateway, "local_echo", {"text": "a"}))
    assert kind == "call_result" and first.ok
    pid = int(first.output.split("pid ")[1].rstrip(")"))
    import os
    import signal

    os.kill(pid, signal.SIGKILL)
    await asyncio.sleep(0.5)
    kind, again = _last(await _execute(mcp_gateway, "local_echo", {"text": "b"}))
    assert kind == "call_result" and again.ok, again
    assert int(again.output.split("pid ")[1].rstrip(")")) != pid
