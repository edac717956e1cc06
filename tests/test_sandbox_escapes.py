"""Model-written code tries to get out of the python tool's sandbox, or to
take the machine down with it; each attempt is contained with a clear error,
and nothing is left running. (Network, read-only /, uid and rlimits are
checked in test_gateway.py; the protocol, the kernel and the view of the
host in test_sandbox_protocol.py, test_sandbox_kernel.py, test_sandbox_view.py.)"""

from __future__ import annotations

import asyncio
import os
import sys

import grpc
import pytest
from conveyor.v1 import common_pb2, tool_gateway_pb2, tool_gateway_pb2_grpc

from conveyor_common.server import stop_server
from tests.conftest import descendant_pids
from tests.test_gateway import Stream, last, results, until_gone
from tool_gateway.config import GatewayConfig, build_parser
from tool_gateway.sandbox import pids_cgroups
from tool_gateway.server import create_server

pb = tool_gateway_pb2
UNIT_TIMEOUT = 4.0
OUTPUT_CAP = 4096
MAX_PROCESSES = 32
MEMORY_MB = 512  # a hog reaches it fast, even on a busy machine
TMP_MB = 64


@pytest.fixture(scope="module")
async def stub():
    config = GatewayConfig(
        unit_timeout=UNIT_TIMEOUT,
        output_cap=OUTPUT_CAP,
        max_processes=MAX_PROCESSES,
        memory_mb=MEMORY_MB,
        tmp_mb=TMP_MB,
    )
    server, port = await create_server(config, "127.0.0.1", 0)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield tool_gateway_pb2_grpc.ToolGatewayServiceStub(channel)
    await stop_server(server, 0)


async def test_secrets_outside_the_sandbox_stay_unreadable(stub):
    stream = Stream(stub)
    events = await stream.run(
        "a",
        "import os",
        "open('/etc/shadow').read()",
        "os.path.exists('/root/.cache'), os.path.exists('/root/.bashrc')",
        "sorted(int(p) for p in os.listdir('/proc') if p.isdigit())[-1] < 10",
        "sorted(os.environ)",
        "open('/proc/1/cmdline').read()",
    )
    _, shadow, root, pids, env, cmdline = results(events)
    assert "FileNotFoundError" in shadow.exception  # not even there
    assert root.value == "(False, False)"  # no home folders in the sandbox
    assert pids.value == "True"  # only the sandbox's own processes are visible
    assert env.value == "['HOME', 'LANG', 'PATH', 'PWD']"  # nothing of the gateway's
    assert "bwrap" in cmdline.value or "python" in cmdline.value  # its own pid 1, not the host's
    await stream.end()


@pytest.mark.skipif(pids_cgroups().new(1) == "", reason="no pids cgroup can be made here")
async def test_a_fork_bomb_hits_the_process_limit(stub):
    before = descendant_pids()
    stream = Stream(stub)
    events = await stream.run(
        "bomb",
        "import os, time",
        # Each child keeps forking; the parent counts its own successful forks.
        "def bomb():\n"
        "    made = 0\n"
        "    for _ in range(10_000):\n"
        "        try:\n"
        "            if os.fork() == 0:\n"
        "                time.sleep(60)\n"
        "                os._exit(0)\n"
        "            made += 1\n"
        "        except BlockingIOError:\n"
        "            return made\n"
        "    return made\n",
        "bomb()",
        "'still alive'",
    )
    _, _, made, alive = results(events)
    assert made.ok and 0 < int(made.value) < MAX_PROCESSES
    assert alive.value == "'still alive'"
    assert last(events).call_result.ok
    await stream.end()  # closing the stream ends the session and its children
    assert not await until_gone(before), "forked processes outlived the session"


async def test_a_memory_hog_gets_a_memory_error(stub):
    stream = Stream(stub)
    events = await stream.run(
        "hog", "chunks = []", "while True: chunks.append(bytearray(64 << 20))"
    )
    assert last(events).WhichOneof("event") == "call_result", last(events)
    hog = results(events)[1]
    assert not hog.ok and "MemoryError" in hog.exception
    await stream.end()


async def test_huge_output_is_capped(stub):
    stream = Stream(stub)
    events = await stream.run("big", "print('x' * 10_000_000)", "'after'")
    big, after = results(events)
    assert big.truncated and len(big.stdout.encode()) <= OUTPUT_CAP + 200
    assert after.value == "'after'"
    assert len(last(events).call_result.output.encode()) <= 4 * OUTPUT_CAP
    await stream.end()


async def test_an_infinite_loop_in_a_child_process_dies_with_the_session(stub):
    """A unit that leaves a busy child behind and then loops: the timeout
    kills the interpreter and every process it started."""
    before = descendant_pids()
    stream = Stream(stub)
    events = await stream.run(
        "loop",
        "import subprocess, sys",
        "child = subprocess.Popen([sys.executable, '-c', 'while True: pass'])",
        "while True: pass",
    )
    error = last(events).error
    assert error.code == common_pb2.TOOL_ERROR_CODE_TIMEOUT
    assert not await until_gone(before), "a looping child outlived the timeout"
    await stream.end()


async def test_writing_outside_tmp_and_escaping_with_symlinks_fails(stub):
    stream = Stream(stub)
    target = os.path.join(sys.prefix, "pyvenv.cfg")  # the venv is shown, read-only
    with open(target) as f:
        before = f.read()
    events = await stream.run(
        "w",
        "import os",
        "os.symlink('/etc/passwd', '/tmp/link')",
        "open('/tmp/link', 'a').write('x')",
        f"open({target!r}, 'a').write('# pwned')",
        "os.makedirs('/usr/local/evil')",
    )
    _, link, write_link, write_repo, mkdir = results(events)
    assert link.ok  # a symlink inside /tmp is fine ...
    assert not write_link.ok  # ... but the file it names stays read-only
    assert "Read-only file system" in write_repo.exception or "Permission" in write_repo.exception
    assert not mkdir.ok
    with open(target) as f:
        assert f.read() == before
    await stream.end()


async def test_many_sessions_at_once_are_each_contained(stub):
    before = descendant_pids()
    stream = Stream(stub)
    ids = [f"c{i}" for i in range(6)]
    for call_id in ids:
        stream.open(call_id)
        stream.units(call_id, "import os", "os.getpid()")
        stream.close(call_id, 2)
    done = await asyncio.gather(*(stream.wait(c) for c in ids))
    assert all(last(events).call_result.ok for events in done)
    await stream.end()
    assert not await until_gone(before)


async def test_tmp_has_a_size_and_filling_it_is_an_error_in_the_unit(stub):
    """/tmp is memory: it gets --tmp-mb, and the address space gets the rest
    of --memory-mb. A unit that fills it gets ENOSPC; the session goes on."""
    files = TMP_MB * 2 // 16  # of 16 MiB each (under RLIMIT_FSIZE), twice the size in all
    stream = Stream(stub)
    events = await stream.run(
        "tmp",
        "import os, resource",
        "os.statvfs('/tmp').f_blocks * os.statvfs('/tmp').f_frsize",
        "resource.getrlimit(resource.RLIMIT_AS)[0]",
        "chunk = b'x' * (1 << 20)\n"
        f"for i in range({files}):\n"
        "    with open(f'/tmp/fill{i}', 'wb') as f:\n"
        "        for _ in range(16):\n"
        "            f.write(chunk)\n",
        "import glob\nfor path in glob.glob('/tmp/fill*'): os.remove(path)",  # only the fill
        "open('/tmp/after', 'w').write('ok')",
    )
    _, size, address_space, fill, _, after = results(events)
    assert size.value == str(TMP_MB << 20)
    assert address_space.value == str((MEMORY_MB - TMP_MB) << 20)
    assert not fill.ok and "No space left on device" in fill.exception, fill.exception
    assert after.ok and after.value == "2"
    await stream.end()


def test_the_tmp_size_is_a_flag_and_must_leave_memory_for_the_interpreter():
    config = GatewayConfig.from_args(build_parser().parse_args(["--tmp-mb", "32"]))
    assert config.tmp_mb == 32
    with pytest.raises(ValueError, match="tmp_mb"):
        GatewayConfig(tmp_mb=0)
    with pytest.raises(ValueError, match="tmp_mb .* must leave"):
        GatewayConfig(memory_mb=512, tmp_mb=400)


async def test_interpreters_past_max_sessions_fail_with_a_clear_error():
    config = GatewayConfig(unit_timeout=UNIT_TIMEOUT, max_sessions=2)
    server, port = await create_server(config, "127.0.0.1", 0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stream = Stream(tool_gateway_pb2_grpc.ToolGatewayServiceStub(channel))
            for call_id in ("a", "b"):  # two open calls, each holding its interpreter
                stream.open(call_id)
                stream.units(call_id, "x = 1")
            await asyncio.gather(stream.wait("a", "unit_result"), stream.wait("b", "unit_result"))
            third = await stream.run("c", "print('three')")
            error = last(third).error
            assert (
                error.code == common_pb2.TOOL_ERROR_CODE_SANDBOX
                and "--max-sessions" in error.message
            )
            stream.close("a", 1)  # a session ends: its slot is free again
            await stream.wait("a")
            for attempt in range(20):
                fourth = await stream.run(f"d{attempt}", "print('four')")
                if results(fourth):
                    break
                await asyncio.sleep(0.1)
            assert results(fourth)[0].stdout == "four\n"
            stream.close("b", 1)
            await stream.end()
    finally:
        await stop_server(server, 0)
