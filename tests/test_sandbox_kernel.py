"""What of the kernel sandboxed code can reach: no capabilities in any set,
no_new_privs, no new namespaces (user, mount, ...), and a seccomp filter that
makes io_uring, keyrings, ptrace and friends fail with EPERM; while ordinary
Python (threads, subprocesses, multiprocessing) still works."""

from __future__ import annotations

import platform
import signal

import pyseccomp
import pytest

from tests.test_gateway import Stream, gateway_stub, last, results
from tool_gateway import sandbox
from tool_gateway.config import GatewayConfig

CLONE_NEWNS, CLONE_NEWUSER, SIGCHLD = 0x00020000, 0x10000000, 17
ADDR_NO_RANDOMIZE = 0x0040000
# The numbers of this machine's system calls, for ctypes' syscall() inside.
NR = {
    name: pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name)
    for name in (
        "io_uring_setup", "keyctl", "add_key", "ptrace", "bpf", "perf_event_open",
        "userfaultfd", "mount", "setns", "personality", "clone", "process_vm_readv",
    )
}  # fmt: skip

# Runs in the sandbox: `call(nr, *args)` is (result, errno name) of syscall().
SYSCALL = """
import ctypes, errno, os
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def call(nr, *args):
    ctypes.set_errno(0)
    result = libc.syscall(ctypes.c_long(nr), *(ctypes.c_ulong(a) for a in args))
    return result, errno.errorcode.get(ctypes.get_errno(), 0)
def unshare(flags):
    ctypes.set_errno(0)
    return libc.unshare(flags), errno.errorcode.get(ctypes.get_errno(), 0)
"""


@pytest.fixture(scope="module")
async def stub():
    async with gateway_stub(GatewayConfig(unit_timeout=20.0)) as stub:
        yield stub


async def values(stub, *expressions: str, setup: str = "") -> list[str]:
    """The value of each expression, run after SYSCALL and `setup`; all must succeed."""
    stream = Stream(stub)
    events = await stream.run("k", SYSCALL, setup or "pass", *expressions)
    await stream.end()
    outcomes = results(events)
    assert all(o.ok for o in outcomes), [o.exception for o in outcomes if not o.ok]
    assert len(outcomes) == 2 + len(expressions), last(events)
    return [o.value for o in outcomes[2:]]


async def test_no_capability_is_left_in_any_set_and_no_new_privs_is_set(stub):
    (status,) = await values(
        stub,
        "{k: v.strip() for k, v in (line.split(':', 1) for line in open('/proc/self/status'))"
        " if k.startswith(('Cap', 'NoNewPrivs', 'Seccomp'))}",
    )
    fields = eval(status)  # a dict's repr
    for name in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(fields[name], 16) == 0, (name, fields[name])
    assert fields["NoNewPrivs"] == "1"
    assert fields["Seccomp"] == "2"  # a filter is on


NAMESPACES = f"""
import subprocess
def in_child(check):
    pid = os.fork()
    if pid == 0:
        os._exit(check())
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
def raw_clone(flags):
    result = call({NR["clone"]}, flags, 0, 0, 0, 0)
    if result[0] == 0:  # a child was made after all: it leaves at once
        os._exit(0)
    return result
def tool(*argv):
    return subprocess.run(argv, capture_output=True, text=True).stderr
"""


async def test_no_user_or_mount_namespace_can_be_made(stub):
    own, mount, from_child, clone, tool_user, tool_mount = await values(
        stub,
        f"unshare({CLONE_NEWUSER})",
        f"unshare({CLONE_NEWNS})",
        f"in_child(lambda: 1 if unshare({CLONE_NEWUSER})[1] == 'EPERM' else 0)",
        f"raw_clone({CLONE_NEWUSER | SIGCHLD})",
        "tool('unshare', '-U', 'true')",
        "tool('unshare', '-m', 'true')",
        setup=NAMESPACES,
    )
    assert own == mount == "(-1, 'EPERM')"
    assert from_child == "1"
    assert clone == "(-1, 'EPERM')"
    assert "Operation not permitted" in tool_user
    assert "Operation not permitted" in tool_mount


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("io_uring_setup", (1, 0)),  # a NULL params pointer: EFAULT where allowed
        ("keyctl", (0, 0)),  # KEYCTL_GET_KEYRING_ID
        ("add_key", (0, 0, 0, 0, 0)),
        ("ptrace", (0, 0, 0, 0)),  # PTRACE_TRACEME
        ("bpf", (0, 0, 0)),
        ("perf_event_open", (0, 0, 0xFFFFFFFF, 0xFFFFFFFF, 0)),
        ("userfaultfd", (0,)),
        ("mount", (0, 0, 0, 0, 0)),
        ("setns", (0, 0)),
        ("process_vm_readv", (1, 0, 0, 0, 0, 0)),
        ("personality", (ADDR_NO_RANDOMIZE,)),
    ],
)
async def test_kernel_interfaces_an_interpreter_does_not_need_fail_with_eperm(stub, name, args):
    (result,) = await values(stub, f"call({NR[name]}, *{args!r})")
    assert result == "(-1, 'EPERM')", (name, result)


ORDINARY = """
import concurrent.futures, hashlib, json, multiprocessing, sqlite3, ssl, subprocess, threading
from multiprocessing import shared_memory
def threads():
    out = []
    started = [threading.Thread(target=out.append, args=(i,)) for i in range(8)]
    for t in started:
        t.start()
    for t in started:
        t.join()
    return sorted(out) == list(range(8))
def pool():
    with multiprocessing.get_context("fork").Pool(2) as p:
        return p.map(abs, [-1, -2, -3])
def shared():  # POSIX shared memory: /dev/shm
    mine = shared_memory.SharedMemory(create=True, size=4096)
    mine.buf[0] = 7
    other = shared_memory.SharedMemory(mine.name)
    seen = other.buf[0]
    other.close(); mine.close(); mine.unlink()
    return seen
def fork():
    pid = os.fork()
    if pid == 0:
        os._exit(3)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
"""


async def test_ordinary_python_still_works(stub):
    found = await values(
        stub,
        "threads()",
        "subprocess.run(['/bin/true']).returncode",
        "pool()",
        "shared()",
        "fork()",
        f"call({NR['personality']}, 0xFFFFFFFF)[1]",  # reading the personality is fine
        "sqlite3.connect(':memory:').execute('select 1').fetchone()[0]",
        setup=ORDINARY,
    )
    assert found == ["True", "0", "[1, 2, 3]", "7", "3", "0", "1"]


WRONG_ARCH = """
import mmap, platform
def int80():  # a 32-bit system call (getpid) from a 64-bit process, in a child
    code = bytes([0xB8, 20, 0, 0, 0, 0xCD, 0x80, 0xC3])  # mov eax, 20; int 0x80; ret
    page = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(code)
    run = ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(page)))
    pid = os.fork()
    if pid == 0:
        run()
        os._exit(0)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
"""


async def test_a_system_call_of_another_architecture_kills_the_process(stub):
    if platform.machine() != "x86_64":
        pytest.skip("the 32-bit entry tested here is x86's")
    (status,) = await values(stub, "int80()", setup=WRONG_ARCH)
    if status == str(-signal.SIGSEGV):
        pytest.skip("this kernel has no 32-bit system calls at all")
    assert status == str(-signal.SIGSYS)  # seccomp's kill, not getpid's answer


def test_without_root_bwrap_makes_a_user_namespace_that_cannot_make_another(monkeypatch):
    box = sandbox.Sandbox("/usr/bin/bwrap", b"")
    monkeypatch.setattr(sandbox.os, "geteuid", lambda: 1000)
    argv, _ = sandbox.bwrap_argv(box, ["true"], 1 << 20)
    assert "--unshare-user" in argv and "--disable-userns" in argv
    monkeypatch.setattr(sandbox.os, "geteuid", lambda: 0)
    argv, _ = sandbox.bwrap_argv(box, ["true"], 1 << 20)
    # As root there is no user namespace (see sandbox.py): the filter covers it.
    assert "--disable-userns" not in argv and "CAP_SETPCAP" in argv
