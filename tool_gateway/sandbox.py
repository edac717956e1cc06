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
import atexit
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
# Processes and threads of one sandbox (its pids cgroup).
PROCESS_LIMIT = 128
# RLIMIT_NPROC: processes and threads of the sandbox uid, all sandboxes
# together; the backstop where no pids cgroup can be made.
UID_PROCESS_LIMIT = 4096
SANDBOX_UID = 65534  # nobody
HIDDEN_DIRS = ("/tmp", "/root", "/home")
PROBE_TIMEOUT_S = 20.0


class SandboxUnavailable(RuntimeError):
    """bubblewrap is missing or cannot create a sandbox here."""


@dataclass(frozen=True)
class Limits:
    cpu_seconds: int
    memory_bytes: int
    open_files: int = OPEN_FILES_LIMIT
    file_size_bytes: int = FILE_SIZE_LIMIT
    processes: int = PROCESS_LIMIT


@dataclass(frozen=True)
class Sandbox:
    """A bubblewrap that has proven to work here."""

    bwrap: str


def bwrap_argv(bwrap: str, command: Sequence[str]) -> list[str]:
    argv = [
        bwrap,
        "--ro-bind", "/", "/",
        "--perms", "01777", "--tmpfs", "/tmp",  # writable by the sandbox's nobody
        "--proc", "/proc",
        "--dev", "/dev",
    ]  # fmt: skip
    if os.path.isdir("/run") and not os.path.islink("/run"):
        argv += ["--tmpfs", "/run"]
    # Home folders are hidden behind empty ones, like /tmp: they hold keys and
    # tokens. The interpreter or a checkout living there (a pyenv under /root,
    # CI's clone under /tmp) is shown again, read-only.
    for hidden in HIDDEN_DIRS:
        if hidden != "/tmp" and not os.path.isdir(hidden):
            continue
        if hidden != "/tmp":  # /tmp is already a fresh tmpfs
            argv += ["--tmpfs", hidden]
        for path in _runtime_paths_under(hidden):
            # bwrap would make the folders between as 0700: nobody could pass.
            parent = os.path.dirname(path)
            between = []
            while parent != hidden:
                between.append(parent)
                parent = os.path.dirname(parent)
            for folder in reversed(between):
                argv += ["--perms", "0755", "--dir", folder]
            argv += ["--ro-bind", path, path]
    argv += ["--chdir", "/tmp", "--die-with-parent", "--new-session"]
    if os.geteuid() == 0:
        # As root, bwrap would map the sandbox's uid onto root outside, and the
        # code would own every root-owned file it can see (/etc/shadow). So no
        # user namespace: the code starts as root with only the two
        # capabilities it needs to become nobody, for real, and drops them.
        argv += [
            "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts",
            "--unshare-cgroup-try",
            "--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID",
            "--", sys.executable, "-I", "-S", "-c", _BECOME_NOBODY, str(SANDBOX_UID),
        ]  # fmt: skip
    else:
        # Not root: an unprivileged uid in a user namespace of its own.
        argv += [
            "--unshare-all",
            "--unshare-user", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID),
            "--cap-drop", "ALL",
            "--",
        ]  # fmt: skip
    return argv + list(command)


# Runs first inside a sandbox started by root: becomes nobody (which clears
# every capability), then execs the real command.
_BECOME_NOBODY = """
import os, sys
uid = int(sys.argv[1])
os.setgroups([])
os.setgid(uid)
os.setuid(uid)
os.execvp(sys.argv[2], sys.argv[2:])
"""


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
cpu, memory, files, fsize, nproc = map(int, sys.argv[1:6])
cgroup = sys.argv[6]
if cgroup != "-":
    with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))
r.setrlimit(r.RLIMIT_CPU, (cpu, cpu + 1))
r.setrlimit(r.RLIMIT_AS, (memory, memory))
r.setrlimit(r.RLIMIT_NOFILE, (files, files))
r.setrlimit(r.RLIMIT_FSIZE, (fsize, fsize))
r.setrlimit(r.RLIMIT_NPROC, (nproc, nproc))
os.execvp(sys.argv[7], sys.argv[7:])
"""


def limited_argv(limits: Limits, command: Sequence[str], cgroup: str = "") -> list[str]:
    """`command` under the rlimits, inside `cgroup` when given. The soft CPU
    limit sends SIGXCPU (fatal); the hard one, a second later, SIGKILL."""
    values = (
        limits.cpu_seconds,
        limits.memory_bytes,
        limits.open_files,
        limits.file_size_bytes,
        UID_PROCESS_LIMIT,
    )
    return [
        sys.executable, "-I", "-S", "-c", _LIMIT_THEN_EXEC, *map(str, values), cgroup or "-",
        *command,
    ]  # fmt: skip


class PidsCgroups:
    """One pids cgroup per sandboxed process tree, holding it to
    `Limits.processes` tasks: a fork bomb hits that wall, whatever the uid
    (RLIMIT_NPROC does not bind root's processes, and the sandbox starts as
    root where the interpreter is not readable by an unprivileged uid).
    Where this process may not create cgroups, there are none, and a fork
    bomb is stopped only by the unit's wall-clock limit (said in the log)."""

    CANDIDATES = ("/sys/fs/cgroup/pids", "/sys/fs/cgroup")  # cgroup v1, then v2

    def __init__(self) -> None:
        self._root: str | None = None
        self._next = 0
        for base in self.CANDIDATES:
            self._remove_stale(base)
            root = os.path.join(base, f"conveyor-gateway-{os.getpid()}")
            try:
                os.makedirs(root, exist_ok=True)
                if os.path.exists(os.path.join(root, "pids.max")):
                    self._root = root
                    break
                os.rmdir(root)
            except OSError:
                continue
        if self._root is None:
            log.warning("no pids cgroup can be made here; fork bombs meet only the unit timeout")
        else:
            atexit.register(self._remove_tree, self._root)

    @classmethod
    def _remove_tree(cls, root: str) -> None:
        """Removes a gateway's cgroups once their processes are gone."""
        try:
            for child in os.listdir(root):
                if child.startswith("s"):
                    cls.remove(os.path.join(root, child))
            os.rmdir(root)
        except OSError:
            pass

    @classmethod
    def _remove_stale(cls, base: str) -> None:
        """Cgroups left by gateways that died without cleaning up."""
        try:
            names = os.listdir(base)
        except OSError:
            return
        for name in names:
            pid = name.removeprefix("conveyor-gateway-")
            if name.startswith("conveyor-gateway-") and pid.isdigit():
                if not os.path.exists(f"/proc/{pid}"):
                    cls._remove_tree(os.path.join(base, name))

    def new(self, limit: int) -> str:
        """A fresh cgroup limited to `limit` tasks ("" when unavailable)."""
        if self._root is None:
            return ""
        self._next += 1
        path = os.path.join(self._root, f"s{self._next}")
        try:
            os.mkdir(path)
            with open(os.path.join(path, "pids.max"), "w") as f:
                f.write(str(limit))
        except OSError as e:
            log.warning("could not make a pids cgroup", path=path, error=str(e))
            return ""
        return path

    @staticmethod
    def remove(path: str) -> None:
        """Removes an emptied cgroup (its processes are dead by now)."""
        if path:
            try:
                os.rmdir(path)
            except OSError:
                pass  # a process still exiting; the gateway's exit removes the rest


_cgroups: PidsCgroups | None = None


def pids_cgroups() -> PidsCgroups:
    global _cgroups
    if _cgroups is None:
        _cgroups = PidsCgroups()
    return _cgroups


async def spawn(
    command: Sequence[str],
    limits: Limits,
    sandbox: Sandbox | None,
    cwd: str = "/tmp",
    cgroup: str = "",
) -> asyncio.subprocess.Process:
    """Starts `command` with pipes on fds 0-2 and the rlimits, sandboxed when
    `sandbox` is set (cwd then means the sandbox's own /tmp), in `cgroup`
    when given. The process leads a new session, so its process group can be
    killed as one."""
    argv = bwrap_argv(sandbox.bwrap, command) if sandbox else list(command)
    return await asyncio.create_subprocess_exec(
        *limited_argv(limits, argv, cgroup),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=SANDBOX_ENV,
        cwd=None if sandbox else cwd,
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


async def _probe(sandbox: Sandbox) -> str | None:
    """Starts an interpreter in a sandbox once; returns why it failed, if it did."""
    limits = Limits(cpu_seconds=10, memory_bytes=1 << 30)
    command = bwrap_argv(sandbox.bwrap, [sys.executable, "-I", "-S", "-c", ""])
    proc = await asyncio.create_subprocess_exec(
        *limited_argv(limits, command),
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


async def find_sandbox(allow_unsandboxed: bool) -> Sandbox | None:
    """A bubblewrap that has proven to work, or None when running without a
    sandbox is allowed; otherwise raises SandboxUnavailable."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        problem = "bubblewrap (bwrap) is not installed"
    else:
        sandbox = Sandbox(bwrap)
        problem = await _probe(sandbox)
        if problem is None:
            return sandbox
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
