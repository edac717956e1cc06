"""The tool gateway in-process on port 0, running real sandboxed Python."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections import defaultdict
from pathlib import Path

import grpc
import pytest
from conveyor.v1 import common_pb2, tool_gateway_pb2, tool_gateway_pb2_grpc

from conveyor_common.server import stop_server
from tests.conftest import descendant_pids
from tool_gateway.config import DEFAULT_TMP_MB, GatewayConfig, build_parser
from tool_gateway.registry import build_registry
from tool_gateway.sandbox import SandboxUnavailable
from tool_gateway.server import create_server
from tool_gateway.tools.base import Unit

UNIT_TIMEOUT = 2.0
OUTPUT_CAP = 4096
pb = tool_gateway_pb2


@contextlib.asynccontextmanager
async def gateway_stub(config: GatewayConfig):
    """A gateway on a free loopback port and a stub of it, stopped on exit."""
    server, port = await create_server(config, "127.0.0.1", 0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield tool_gateway_pb2_grpc.ToolGatewayServiceStub(channel)
    finally:
        await stop_server(server, 0)


@pytest.fixture(scope="module")
async def gateway_port():
    config = GatewayConfig(unit_timeout=UNIT_TIMEOUT, output_cap=OUTPUT_CAP)
    server, port = await create_server(config, "127.0.0.1", 0)
    yield port
    await stop_server(server, 0)


@pytest.fixture
async def stub(gateway_port):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway_port}") as channel:
        yield tool_gateway_pb2_grpc.ToolGatewayServiceStub(channel)


class Stream:
    """One Execute stream: send instructions, collect each call's events."""

    def __init__(self, stub):
        self._outbox: asyncio.Queue = asyncio.Queue()
        self.call = stub.Execute(self._requests(), timeout=60)
        self.events: dict[str, list[pb.ExecuteResponse]] = defaultdict(list)
        self.order: list[str] = []  # call ids in the order their last event came
        self._changed = asyncio.Condition()
        self._reader = asyncio.create_task(self._read())

    async def _requests(self):
        while (request := await self._outbox.get()) is not None:
            yield request

    async def _read(self) -> None:
        async for response in self.call:
            async with self._changed:
                self.events[response.call_id].append(response)
                if response.WhichOneof("event") in ("call_result", "error"):
                    self.order.append(response.call_id)
                self._changed.notify_all()

    def send(self, call_id: str, **action) -> None:
        self._outbox.put_nowait(pb.ExecuteRequest(call_id=call_id, **action))

    def open(self, call_id: str, tool: str = "python", session_key: str = "") -> None:
        self.send(call_id, open=pb.OpenCall(run_id="test", tool_name=tool, session_key=session_key))

    def units(self, call_id: str, *texts: str, start: int = 0) -> None:
        for i, text in enumerate(texts, start):
            self.send(call_id, unit=pb.CommandUnit(index=i, text=text))

    def close(self, call_id: str, unit_count: int = 0) -> None:
        self.send(call_id, close=pb.CloseCall(unit_count=unit_count))

    async def wait(self, call_id: str, kind: str = "end", timeout: float = 15):
        """Waits for the call's last event (or its first event of `kind`)."""

        def seen():
            kinds = [e.WhichOneof("event") for e in self.events[call_id]]
            return call_id in self.order if kind == "end" else kind in kinds

        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(seen), timeout)
        return self.events[call_id]

    async def run(self, call_id: str, *texts: str, session_key: str = ""):
        self.open(call_id, session_key=session_key)
        self.units(call_id, *texts)
        self.close(call_id, len(texts))
        return await self.wait(call_id)

    async def end(self) -> None:
        """Half-closes the stream and waits for the gateway to end it."""
        self._outbox.put_nowait(None)
        await asyncio.wait_for(self._reader, 15)


def results(events) -> list[common_pb2.UnitResult]:
    return [e.unit_result for e in events if e.WhichOneof("event") == "unit_result"]


def last(events) -> pb.ExecuteResponse:
    return events[-1]


async def until_gone(before: set[int], timeout: float = 5.0) -> set[int]:
    """The tool processes started since `before` that are still alive after
    waiting up to `timeout` for them to die."""
    for _ in range(int(timeout / 0.05)):
        left = descendant_pids() - before
        if not left:
            return left
        await asyncio.sleep(0.05)
    return descendant_pids() - before


def test_flags_make_the_config():
    config = GatewayConfig.from_args(build_parser().parse_args(["--unit-timeout", "5"]))
    assert config.unit_timeout == 5.0 and config.output_cap == 64 * 1024
    assert not config.allow_unsandboxed and config.port == 50053
    with pytest.raises(ValueError, match="unit_timeout"):
        GatewayConfig(unit_timeout=0)


async def test_list_tools_shows_python_and_its_partial_mode(stub):
    response = await stub.ListTools(pb.ToolGatewayServiceListToolsRequest(), timeout=5)
    tools = {t.name: t for t in response.tools}
    python = tools["python"]
    assert python.partial_mode == common_pb2.PARTIAL_MODE_PYTHON_STATEMENTS
    assert python.partial_safe and python.command_field == "code"
    assert json.loads(python.parameters_json_schema)["required"] == ["code"]


async def test_units_run_in_order_and_sessions_keep_variables(stub):
    stream = Stream(stub)
    events = await stream.run("a", "x = 20", "x += 1", "print(x)", session_key="s")
    kinds = [(e.WhichOneof("event"), getattr(e, e.WhichOneof("event")).index) for e in events[:-1]]
    assert kinds == [(k, i) for i in range(3) for k in ("unit_started", "unit_result")]
    end = last(events).call_result
    assert end.ok and end.units_executed == 3 and end.output == "21"
    # A later call with the same key sees the variables; one without a key does not.
    later = await stream.run("b", "x * 2", session_key="s")
    assert results(later)[0].value == "42"
    fresh = await stream.run("c", "x")
    assert "NameError" in results(fresh)[0].exception
    await stream.end()


async def test_expression_value_and_exception_then_the_next_unit(stub):
    stream = Stream(stub)
    events = await stream.run("a", "def f(n):\n    return 10 / n\n", "f(0)", "None", "'after'")
    define, error, none, after = results(events)
    assert define.ok and define.value == ""
    assert not error.ok and error.exception.startswith("Traceback")
    assert "ZeroDivisionError: division by zero" in error.exception
    assert "return 10 / n" in error.exception  # the source of an earlier unit
    assert "python_repl" not in error.exception  # no gateway frames
    assert none.ok and none.value == ""
    assert after.ok and after.value == "'after'"
    end = last(events).call_result
    assert not end.ok and end.units_executed == 4
    assert "ZeroDivisionError" in end.output and end.output.endswith("'after'")
    syntax = results(await stream.run("b", "x = = 1"))[0]
    assert not syntax.ok and "SyntaxError" in syntax.exception and "ast.py" not in syntax.exception
    await stream.end()


async def test_output_is_captured_and_cannot_corrupt_the_protocol(stub):
    stream = Stream(stub)
    events = await stream.run(
        "a",
        "import os, sys",
        "print('hello'); print('oops', file=sys.stderr)",
        # Lone surrogates, NULs, a fake length-prefixed frame, raw bytes, fd 1 itself.
        "sys.stdout.write('\\x00\\udcff\\x00\\x00\\x00\\x05{\"a\"'); "
        "sys.stdout.buffer.write(b'\\xff\\xfe\\n'); os.write(1, b'\\x00\\x00\\x00\\x02{}')",
        "print('x' * 10_000)",
        "input()",
        "40 + 2",
    )
    _, hello, weird, big, read, answer = results(events)
    assert (hello.stdout, hello.stderr) == ("hello\n", "oops\n")
    assert weird.ok and weird.stdout.startswith("\x00\\udcff\x00\x00\x00\x05{")
    assert weird.stdout.endswith("\ufffd\ufffd\n")
    assert big.truncated and len(big.stdout) == OUTPUT_CAP
    assert "EOFError" in read.exception  # stdin is not the protocol pipe
    assert answer.value == "42"
    await stream.end()


async def test_unknown_tool_fails_that_call_and_the_stream_goes_on(stub):
    stream = Stream(stub)
    stream.open("a", tool="nope")
    stream.units("a", "1")
    stream.close("a", 1)
    error = last(await stream.wait("a")).error
    assert error.code == common_pb2.TOOL_ERROR_CODE_UNKNOWN_TOOL
    assert "'nope'" in error.message and "python" in error.message
    assert last(await stream.run("b", "1 + 1")).call_result.output == "2"
    assert len(stream.events["a"]) == 1  # the units of the failed call were dropped
    await stream.end()


async def test_out_of_order_messages_are_bad_requests(stub):
    stream = Stream(stub)
    stream.units("ghost", "1")
    error = last(await stream.wait("ghost")).error
    assert error.code == common_pb2.TOOL_ERROR_CODE_BAD_REQUEST and "open" in error.message
    stream.open("skip")
    stream.send("skip", unit=pb.CommandUnit(index=1, text="1"))
    error = last(await stream.wait("skip")).error
    assert (
        error.code == common_pb2.TOOL_ERROR_CODE_BAD_REQUEST
        and "unit 0 was expected" in error.message
    )
    stream.open("lost")
    stream.units("lost", "1")
    stream.close("lost", unit_count=2)
    error = last(await stream.wait("lost")).error
    assert error.code == common_pb2.TOOL_ERROR_CODE_BAD_REQUEST and "2 units" in error.message
    await stream.end()


async def test_calls_on_one_stream_run_in_parallel(stub):
    stream = Stream(stub)
    stream.open("slow")
    stream.units("slow", "import time; time.sleep(1)")
    stream.close("slow", 1)
    await stream.wait("slow", "unit_started")
    await stream.run("quick", "1")
    await stream.wait("slow")
    assert stream.order == ["quick", "slow"]
    await stream.end()


async def test_unit_timeout_kills_the_interpreter(stub):
    before = descendant_pids()
    stream = Stream(stub)
    stream.open("a", session_key="s")
    stream.units("a", "x = 1", "while True: pass", "print('never')")
    stream.close("a", 3)
    events = await stream.wait("a")
    error = last(events).error
    assert (
        error.code == common_pb2.TOOL_ERROR_CODE_TIMEOUT and f"{UNIT_TIMEOUT:g} s" in error.message
    )
    assert len(results(events)) == 1
    assert not await until_gone(before), "the timed-out interpreter is still alive"
    # The key now gets a fresh interpreter.
    assert "NameError" in results(await stream.run("b", "x", session_key="s"))[0].exception
    await stream.end()


async def test_a_dead_interpreter_is_a_sandbox_error(stub):
    stream = Stream(stub)
    error = last(await stream.run("a", "import os; os.kill(os.getpid(), 9)")).error
    assert error.code == common_pb2.TOOL_ERROR_CODE_SANDBOX and "SIGKILL" in error.message
    error = last(await stream.run("b", "import os; os._exit(3)")).error
    assert (
        error.code == common_pb2.TOOL_ERROR_CODE_SANDBOX and "exited with code 3" in error.message
    )
    memory = results(await stream.run("c", "b = bytearray(8 << 30)", "'alive'"))
    assert "MemoryError" in memory[0].exception and memory[1].value == "'alive'"
    await stream.end()


async def test_the_sandbox_has_no_network_and_a_read_only_filesystem(stub, gateway_port):
    probe = Path(sys.prefix) / "sandbox-probe.txt"  # the venv: shown, read-only
    stream = Stream(stub)
    events = await stream.run(
        "a",
        "import socket",
        "[name for _, name in socket.if_nameindex()]",
        f"socket.create_connection(('127.0.0.1', {gateway_port}), timeout=2)",
        f"open({str(probe)!r}, 'w')",
        "open('/tmp/scratch', 'w').write('ok')",
        "__import__('os').getpid()",
        "import resource",
        "resource.getrlimit(resource.RLIMIT_NOFILE), resource.getrlimit(resource.RLIMIT_AS)",
        "__import__('os').getuid()",
    )
    _, interfaces, connect, write, scratch, pid, _, limits, uid = results(events)
    assert interfaces.value == "['lo']"
    assert "ConnectionRefusedError" in connect.exception  # the gateway's port is not reachable
    assert "Read-only file system" in write.exception and not probe.exists()
    assert scratch.value == "2"
    assert int(pid.value) < 10  # its own PID namespace
    address_space = (2048 - DEFAULT_TMP_MB) << 20  # /tmp comes out of --memory-mb
    assert limits.value == f"((256, 256), ({address_space}, {address_space}))"
    assert uid.value == "65534"  # nobody, even though the gateway runs as root here
    await stream.end()


async def test_calls_sharing_a_session_run_their_units_in_stream_order(stub):
    # Everything is sent before the first unit ends: without an order, call b's
    # unit would take the session between a's `a = 6` and `b = 7`.
    stream = Stream(stub)
    stream.open("a", session_key="s")
    stream.units("a", "import time; time.sleep(0.3)", "a = 6", "b = 7")
    stream.close("a", 3)
    stream.open("b", session_key="s")
    stream.units("b", "print(a + b)")
    stream.close("b", 1)
    assert last(await stream.wait("b")).call_result.output == "13"
    assert last(await stream.wait("a")).call_result.ok
    await stream.end()


async def test_a_call_that_ends_early_does_not_hold_up_its_session(stub):
    stream = Stream(stub)
    # Cancelled while its unit waits its turn behind call a's.
    stream.open("a", session_key="s")
    stream.units("a", "import time; time.sleep(0.5)")
    stream.close("a", 1)
    stream.open("b", session_key="s")
    stream.units("b", "x = 1")
    stream.open("c", session_key="s")
    stream.units("c", "print('c ran')")
    stream.close("c", 1)
    await stream.wait("a", "unit_started")
    stream.send("b", cancel=pb.CancelCall(reason="gave up"))
    assert last(await stream.wait("b")).error.code == common_pb2.TOOL_ERROR_CODE_CANCELLED
    assert last(await stream.wait("c")).call_result.output == "c ran"
    assert last(await stream.wait("a")).call_result.ok
    # Failed on a unit sent out of order, with a later unit of its own queued.
    stream.open("d", session_key="t")
    stream.units("d", "y = 1", start=1)
    stream.units("d", "y = 2", start=2)
    stream.open("e", session_key="t")
    stream.units("e", "print('e ran')")
    stream.close("e", 1)
    assert last(await stream.wait("d")).error.code == common_pb2.TOOL_ERROR_CODE_BAD_REQUEST
    assert last(await stream.wait("e")).call_result.output == "e ran"
    await stream.end()


async def test_cancel_call_kills_its_work(stub):
    before = descendant_pids()
    stream = Stream(stub)
    stream.open("a")
    stream.units("a", "import time; time.sleep(30)")
    await stream.wait("a", "unit_started")
    stream.send("a", cancel=pb.CancelCall(reason="user gave up"))
    error = last(await stream.wait("a")).error
    assert error.code == common_pb2.TOOL_ERROR_CODE_CANCELLED and "user gave up" in error.message
    assert not await until_gone(before)
    await stream.end()


async def test_cancelling_the_stream_kills_every_interpreter(stub):
    before = descendant_pids()
    stream = Stream(stub)
    for call_id, key in (("a", "s"), ("b", "")):
        stream.open(call_id, session_key=key)
        stream.units(call_id, "import time; time.sleep(30)")
        await stream.wait(call_id, "unit_started")
    await asyncio.sleep(0.2)  # let the sleeps start inside the sandboxes
    assert descendant_pids() - before, "no interpreter process was started"
    stream.call.cancel()
    assert not await until_gone(before), "tool processes were left behind"


async def test_ending_the_stream_finishes_closed_calls_and_cancels_open_ones(stub):
    before = descendant_pids()
    stream = Stream(stub)
    stream.open("open")
    stream.units("open", "1")
    await stream.wait("open", "unit_result")
    stream.open("closed")
    stream.units("closed", "import time; time.sleep(0.3)", "'done'")
    stream.close("closed", 2)
    await stream.end()
    assert last(stream.events["closed"]).call_result.output == "'done'"
    assert last(stream.events["open"]).error.code == common_pb2.TOOL_ERROR_CODE_CANCELLED
    assert not await until_gone(before)


async def test_without_bubblewrap_the_tool_refuses_unless_allowed(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(SandboxUnavailable, match="--allow-unsandboxed"):
        await build_registry(GatewayConfig())
    registry = await build_registry(GatewayConfig(allow_unsandboxed=True))
    tool = registry.get("python")
    assert tool is not None
    session = await tool.open_session("")
    try:
        outcome = await session.run_unit(Unit(0, "__import__('resource').getrlimit(7)"))
        assert outcome.value == "(256, 256)"  # RLIMIT_NOFILE: the limits still apply
    finally:
        await session.close()


async def test_a_long_unit_streams_its_output_while_it_runs(stub):
    stream = Stream(stub)
    events = await stream.run(
        "p", "import time\nfor i in range(3):\n    print('step', i)\n    time.sleep(0.35)\n"
    )
    kinds = [e.WhichOneof("event") for e in events]
    progress = [e.unit_progress for e in events if e.WhichOneof("event") == "unit_progress"]
    assert len(progress) >= 2, kinds  # it printed three times over ~1 s
    assert kinds.index("unit_progress") < kinds.index("unit_result")
    streamed = "".join(p.stdout for p in progress if p.index == 0)
    (loop,) = results(events)
    assert loop.stdout == "step 0\nstep 1\nstep 2\n"
    assert loop.stdout.startswith(streamed) and "step 0" in streamed
    await stream.end()
