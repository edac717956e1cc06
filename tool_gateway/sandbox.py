"""Starting, limiting and killing tool processes.

With bubblewrap a process gets no network (its own, empty, net namespace), its
own PID namespace, the uid of nobody, a read-only view of / (the interpreter and its libraries),
a private /tmp, /proc and /dev, no capabilities, and /run hidden (it holds the
host's sockets). Without bubblewrap (only with --allow-unsandboxed) the rlimits
below are all there is. Either way the process leads its own process group, so
one killpg ends it; in the sandbox bwrap's death takes its whole PID namespace,
and so every process the code started, along.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import structlog

log = structlog.get_logger("sandbox")

# What a sandboxed process sees of the environment: nothing of the gateway's.
SANDBOX_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8"}
# /tmp lives in memory; this bounds any one file written there.
FILE_SIZE_LIMIT = 256 * 1024 * 1024
OPEN_FILES_LIMIT = 256
SANDBOX_UID = 65534  # nobody
PROBE_TIMEOUT_S = 20.0


class SandboxUnavailable(RuntimeError):
    """bubblewrap is missing or cannot create a sandbox here."""


@dataclass(frozen=True)
class Limits:
    cpu_seconds: int
    memory_bytes: int
    open_files: int = OPEN_FILES_LIMIT
    file_size_bytes: int = FILE_SIZE_LIMIT


def bwrap_argv(bwrap: str, command: Sequence[str]) -> list[str]:
    argv = [
        bwrap,
        "--ro-bind", "/", "/",
        "--tmpfs", "/tmp",
        "--proc", "/proc",
        "--dev", "/dev",
    ]  # fmt: skip
    if os.path.isdir("/run") and not os.path.islink("/run"):
        argv += ["--tmpfs", "/run"]
    # The private /tmp hides whatever the host keeps there; a checkout (and
    # its .venv) under /tmp, as CI's may be, is shown again, read-only.
    for path in _runtime_paths_under("/tmp"):
        argv += ["--ro-bind", path, path]
    argv += [
        "--chdir", "/tmp",
        "--unshare-all",
        # An unprivileged uid in its own user namespace: the code is not root
        # even where the gateway runs as root (as in its container).
        "--unshare-user", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID),
        "--cap-drop", "ALL",  # as root, bwrap would otherwise keep every capability
        "--die-with-parent",
        "--new-session",
        "--",
        *command,
    ]  # fmt: skip
    return argv


def _runtime_paths_under(root: str) -> list[str]:
    """The interpreter's prefixes and this package's folder, where under root."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    candidates = {
        sys.prefix,
        sys.base_prefix,
        os.path.dirname(os.path.realpath(sys.executable)),
        here,
    }
    inside = sorted(
        os.path.realpath(p) for p in candidates if os.path.realpath(p).startswith(root + "/")
    )
    # Drop paths already covered by a shorter one.
    return [p for i, p in enumerate(inside) if not any(p.startswith(q + "/") for q in inside[:i])]


# Sets the rlimits, then execs the real command (so no process stays behind).
# A separate interpreter does this because the gateway is multi-threaded (gRPC):
# a preexec_fn there runs Python between fork and exec, which can crash or
# deadlock the child. The limits hold for bwrap and everything below it.
_LIMIT_THEN_EXEC = """
import os, resource as r, sys
cpu, memory, files, fsize = map(int, sys.argv[1:5])
r.setrlimit(r.RLIMIT_CPU, (cpu, cpu + 1))
r.setrlimit(r.RLIMIT_AS, (memory, memory))
r.setrlimit(r.RLIMIT_NOFILE, (files, files))
r.setrlimit(r.RLIMIT_FSIZE, (fsize, fsize))
os.execvp(sys.argv[5], sys.argv[5:])
"""


def limited_argv(limits: Limits, command: Sequence[str]) -> list[str]:
    """`command` under the rlimits. The soft CPU limit sends SIGXCPU (fatal);
    the hard one, a second later, SIGKILL."""
    values = (limits.cpu_seconds, limits.memory_bytes, limits.open_files, limits.file_size_bytes)
    return [sys.executable, "-I", "-S", "-c", _LIMIT_THEN_EXEC, *map(str, values), *command]


async def spawn(
    command: Sequence[str], limits: Limits, bwrap: str | None, cwd: str = "/tmp"
) -> asyncio.subprocess.Process:
    """Starts `command` with pipes on fds 0-2 and the rlimits, sandboxed when
    `bwrap` is set (cwd then means the sandbox's own /tmp). The process leads
    a new session, so its process group can be killed as one."""
    argv = bwrap_argv(bwrap, command) if bwrap else list(command)
    return await asyncio.create_subprocess_exec(
        *limited_argv(limits, argv),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=SANDBOX_ENV,
        cwd=None if bwrap else cwd,
        start_new_session=True,
        close_fds=True,
    )


def kill_group(proc: asyncio.subprocess.Process) -> None:
    """SIGKILLs the process's group at once (without waiting)."""
    if proc.returncode is not None:
        return  # reaped: its pid, and so its group id, may belong to another process now
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


async def kill_and_reap(proc: asyncio.subprocess.Process) -> None:
    kill_group(proc)
    await proc.wait()


def death_signal(returncode: int, sandboxed: bool) -> int | None:
    """The signal that killed a process: negative codes come from the kernel;
    bwrap reports its child's death by signal N as exit code 128 + N."""
    if returncode < 0:
        return -returncode
    if sandboxed and returncode > 128:
        return returncode - 128
    return None


async def _probe(bwrap: str) -> str | None:
    """Starts an interpreter in a sandbox once; returns why it failed, if it did."""
    proc = await asyncio.create_subprocess_exec(
        *bwrap_argv(bwrap, [sys.executable, "-I", "-S", "-c", ""]),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=SANDBOX_ENV,
        start_new_session=True,
    )
    try:
        _, stderr = await asyncio.wait_for(proc.communicate(), PROBE_TIMEOUT_S)
    except TimeoutError:
        await kill_and_reap(proc)
        return f"a test sandbox did not exit within {PROBE_TIMEOUT_S:g} s"
    if proc.returncode != 0:
        return stderr.decode(errors="replace").strip() or f"exit code {proc.returncode}"
    return None


async def find_sandbox(allow_unsandboxed: bool) -> str | None:
    """bwrap's path once it has proven to work, or None when running without
    a sandbox is allowed; otherwise raises SandboxUnavailable."""
    bwrap = shutil.which("bwrap")
    problem = "bubblewrap (bwrap) is not installed" if bwrap is None else await _probe(bwrap)
    if problem is None:
        return bwrap
    if not allow_unsandboxed:
        raise SandboxUnavailable(
            f"cannot sandbox tool code: {problem}. Install bubblewrap (apt-get install "
            "bubblewrap) and let it create namespaces (in a container: the capabilities and "
            "security options docker-compose.yml gives the gateway), or pass "
            "--allow-unsandboxed to run code with resource limits only (unsafe)."
        )
    log.warning(
        "RUNNING TOOL CODE WITHOUT A SANDBOX: model-written code can reach the network "
        "and write every file this process can; only resource limits apply",
        reason=problem,
    )
    return None
