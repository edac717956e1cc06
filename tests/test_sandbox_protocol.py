"""Code in the sandbox forges frames on the REPL's private reply pipe. The
gateway bounds each frame before reading it, checks its shape, types and
sequence number, and caps its texts: a bad frame fails the call with a
SANDBOX error and kills the interpreter, and nothing it sends gets past the
output cap or makes the gateway buffer more than a frame's bound."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from conveyor.v1 import common_pb2, tool_gateway_pb2, tool_gateway_pb2_grpc

from conveyor_common.server import stop_server
from tests.test_gateway import Stream, last, results
from tool_gateway.config import GatewayConfig
from tool_gateway.server import create_server
from tool_gateway.tools.python_tool import max_frame_bytes, session_memory_bound

pb = tool_gateway_pb2
UNIT_TIMEOUT = 10.0
OUTPUT_CAP = 4096

# What forging code does: finds the REPL's reply fd and the seq of the running
# request (off the REPL's own main loop), and writes length-prefixed frames.
FORGE = """
import fcntl, json, os, sys

def reply_fd():
    for fd in sorted(int(name) for name in os.listdir("/proc/self/fd")):
        if fd >= 200 and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_WRONLY:
            return fd

def seq():
    frame = sys._getframe()
    while "request" not in frame.f_locals:
        frame = frame.f_back
    return frame.f_locals["request"].get("seq", 0)

def forge(message=None, raw=None):
    body = raw if raw is not None else json.dumps(message).encode()
    os.write(reply_fd(), len(body).to_bytes(4, "big") + body)

def reply(**changes):
    message = {"seq": seq(), "ok": True, "stdout": "", "stderr": "", "value": "",
               "exception": "", "duration": 0.0, "truncated": False}
    return {**message, **changes}
"""


@pytest.fixture(scope="module")
async def stub():
    config = GatewayConfig(unit_timeout=UNIT_TIMEOUT, output_cap=OUTPUT_CAP)
    server, port = await create_server(config, "127.0.0.1", 0)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield tool_gateway_pb2_grpc.ToolGatewayServiceStub(channel)
    await stop_server(server, 0)


def sandbox_error(events) -> str:
    """The message of the call's SANDBOX error (fails on any other ending)."""
    end = last(events)
    assert end.WhichOneof("event") == "error", end
    assert end.error.code == common_pb2.TOOL_ERROR_CODE_SANDBOX, end.error
    assert "broke the protocol" in end.error.message and "killed" in end.error.message
    return end.error.message


async def test_a_forged_reply_in_step_is_capped_like_a_real_one(stub):
    stream = Stream(stub)
    events = await stream.run(
        "capped",
        FORGE,
        f"forge(reply(stdout='x' * {5 * OUTPUT_CAP}, value='é' * {2 * OUTPUT_CAP}))",
    )
    _, forged = results(events)
    assert forged.truncated
    assert len(forged.stdout.encode()) <= OUTPUT_CAP
    assert len(forged.value.encode()) <= OUTPUT_CAP
    assert last(events).call_result.output.count("x") <= OUTPUT_CAP
    await stream.end()


async def test_a_frame_longer_than_any_reply_is_refused_unread(stub):
    """The issue's 10 MB stdout: refused from its header."""
    stream = Stream(stub)
    events = await stream.run("huge", FORGE, "forge(reply(stdout='x' * 10_000_000))")
    message = sandbox_error(events)
    assert f"more than the {max_frame_bytes(OUTPUT_CAP)}" in message
    await stream.end()


async def test_a_header_declaring_a_gigabyte_fails_at_once(stub):
    """Nothing follows the header: a gateway that waited for the body would
    end in a TIMEOUT, not a SANDBOX error."""
    stream = Stream(stub)
    events = await stream.run(
        "giga",
        FORGE,
        "os.write(reply_fd(), (1 << 30).to_bytes(4, 'big')); __import__('time').sleep(60)",
    )
    assert "a frame of 1073741824 bytes" in sandbox_error(events)
    await stream.end()


@pytest.mark.parametrize(
    ("forgery", "complaint"),
    [
        ("forge({'index': 0})", "without 'seq', 'ok', 'stdout'"),
        ("forge(reply(ok='yes'))", "'ok' is 'yes', not a bool"),
        ("forge(reply(seq=True))", "'seq' is True, not an int"),
        ("forge(reply(stdout=None))", "'stdout' is None, not a str"),
        ("forge(reply(duration=float('nan')))", "'duration' is nan, not a number >= 0"),
        ("forge(reply(extra=1))", "with unknown 'extra'"),
        ("forge({'seq': seq(), 'progress': 5})", "'progress' is 5, not a str"),
        ("forge(raw=b'not json')", "not JSON"),
        ("forge(raw=b'\\xff\\xfe')", "not JSON"),
        ("forge(raw=b'[' * 50_000)", "not JSON"),
        ("forge([1, 2])", "a JSON list, not an object"),
    ],
)
async def test_a_badly_shaped_frame_is_a_sandbox_error(stub, forgery, complaint):
    stream = Stream(stub)
    events = await stream.run("bad", FORGE, forgery, "'never'")
    assert complaint in sandbox_error(events)
    assert len(results(events)) == 1  # the forging unit has no result
    await stream.end()


@pytest.mark.parametrize(
    "forgery",
    [
        "forge(reply(seq=seq() + 7))",  # a reply to a request not yet sent
        "forge({'seq': seq() - 1, 'progress': 'stale'})",  # progress of an earlier one
        "forge(reply(value='forged'))",  # in step; the real reply then comes second
    ],
)
async def test_a_reply_out_of_step_kills_the_interpreter(stub, forgery):
    stream = Stream(stub)
    stream.open("step", session_key="s")
    stream.units("step", FORGE, forgery, "'after'", "'later'")
    stream.close("step", 4)
    events = await stream.wait("step")
    assert "out of step" in sandbox_error(events)
    assert "'after'" not in [r.value for r in results(events)]
    # The killed interpreter is replaced: the key gets a fresh one.
    fresh = results(await stream.run("fresh", "'fresh'", session_key="s"))
    assert fresh[0].value == "'fresh'"
    await stream.end()


async def test_forged_progress_is_capped_for_the_whole_unit(stub):
    stream = Stream(stub)
    events = await stream.run(
        "progress",
        FORGE,
        f"for _ in range(5): forge({{'seq': seq(), 'progress': 'p' * {OUTPUT_CAP}}})\n"
        "forge(reply(value='done'))",
    )
    streamed = "".join(
        e.unit_progress.stdout for e in events if e.WhichOneof("event") == "unit_progress"
    )
    assert "p" in streamed and len(streamed.encode()) <= OUTPUT_CAP
    assert results(events)[1].value == "done"
    await stream.end()


async def test_the_longest_honest_reply_fits_the_frame_bound(stub):
    """Control characters cost JSON six bytes each: a reply full of them in
    every text still passes (the bound is not too tight)."""
    stream = Stream(stub)
    events = await stream.run(
        "honest",
        "import sys",
        "class R:\n    def __repr__(self):\n        return '\\x01' * 100_000\n",
        "sys.stdout.write('\\x00' * 100_000), sys.stderr.write('\\x1f' * 100_000), R()",
        "raise ValueError('\\x02' * 100_000)",
        "'after'",
    )
    _, _, loud, raised, after = results(events)
    assert loud.truncated and len(loud.stdout) == len(loud.stderr) == OUTPUT_CAP
    assert loud.value == "(100000, 100000, " + "\x01" * (OUTPUT_CAP - 17)
    assert raised.truncated and len(raised.exception) == OUTPUT_CAP
    assert after.value == "'after'"
    await stream.end()


def _peak_rss() -> int:
    """This process's peak resident memory (VmHWM), in bytes."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) << 10


async def test_sessions_forging_at_once_stay_within_the_memory_bound(stub):
    """Each session declares a 64 MiB frame and streams it: the gateway (in
    this process) must hold no more than the bound its module documents."""
    sessions = 4
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident size
    except OSError:
        pytest.skip("cannot reset the peak resident size here")
    before = _peak_rss()
    stream = Stream(stub)
    ids = [f"m{i}" for i in range(sessions)]
    for call_id in ids:
        stream.open(call_id)
        stream.units(
            call_id,
            FORGE,
            "body = b' ' * (64 << 20)\nos.write(reply_fd(), len(body).to_bytes(4, 'big') + body)",
        )
        stream.close(call_id, 2)
    done = await asyncio.gather(*(stream.wait(c, timeout=30) for c in ids))
    for events in done:
        sandbox_error(events)
    per_session = session_memory_bound(OUTPUT_CAP)
    slack = 48 << 20  # the interpreter's own allocations while the calls run
    assert _peak_rss() - before < sessions * per_session + slack
    await stream.end()


def test_the_frame_bound_follows_the_output_cap():
    assert max_frame_bytes(64 * 1024) == 24 * 64 * 1024 + 1024
    assert session_memory_bound(64 * 1024) == 4 * (24 * 64 * 1024 + 1024) + (384 << 10)
