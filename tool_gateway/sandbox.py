"""Starting, limiting and killing tool processes.

With bubblewrap a process sees only an allow-list of the host, read-only: /usr
(and /bin, /sbin, /lib* beside it: folders, or the same symlinks into /usr), a
minimal /etc (the dynamic linker's cache and config, localtime,
nsswitch.conf, alternatives, and a passwd and group that hold only root and
nobody), the interpreter's prefixes (sys.base_prefix, sys.prefix: a venv's
folder, not the project around it), and the files a tool hands in (the python
tool's REPL script, at /conveyor/python_repl.py). Nothing else of the host: no
project sources or .git, no /etc/ssh, /var, /root, /home, /opt, /srv, /sys.
It gets a private /tmp of `Limits.tmp_bytes` (/dev/shm points into it, so
POSIX shared memory counts too), a /proc of its own PID namespace, a /dev of
null, zero, full, random, urandom and tty, no network (an empty net
namespace), its own IPC and UTS namespaces, the uid of nobody, no capabilities
in any set, no_new_privs, no nested user namespaces, and the seccomp filter
of seccomp.py. Without bubblewrap (only with --allow-unsandboxed) the rlimits
below are all there is. Either way the process leads its own process group,
so one killpg ends it; in the sandbox bwrap's death takes its whole PID
namespace, and so every process the code started, along.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import os
import shutil
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import structlog

from tool_gateway.seccomp import SeccompUnavailable, seccomp_filter

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
PROBE_TIMEOUT_S = 20.0
PROBE_TMP_BYTES = 1 << 20

# The host's system folders, shown whole (read-only); a symlink among them
# (merged /usr) is made again as the same symlink.
SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# What of /etc the interpreter and its libraries read.
ETC_PATHS = (
    "/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime",
    "/etc/nsswitch.conf", "/etc/alternatives", "/etc/fonts",
)  # fmt: skip
# The only users a sandboxed process can name.
PASSWD = (
    "root:x:0:0:root:/root:/usr/sbin/nologin\n"
    f"nobody:x:{SANDBOX_UID}:{SANDBOX_UID}:nobody:/nonexistent:/usr/sbin/nologin\n"
)
GROUP = f"root:x:0:\nnogroup:x:{SANDBOX_UID}:\n"
# Where the limiter puts what bwrap reads from fds (--seccomp, --ro-bind-data).
FIRST_DATA_FD = 3


class SandboxUnavailable(RuntimeError):
    """bubblewrap is missing or cannot create a sandbox here."""


@dataclass(frozen=True)
class Limits:
    cpu_seconds: int
    memory_bytes: int  # in a sandbox: its address space and its /tmp together
    tmp_bytes: int  # the size of a sandbox's /tmp
    open_files: int = OPEN_FILES_LIMIT
    file_size_bytes: int = FILE_SIZE_LIMIT
    processes: int = PROCESS_LIMIT

    def address_space(self, sandboxed: bool) -> int:
        """RLIMIT_AS. A sandbox's /tmp is memory too, so it comes out of the
        budget; unsandboxed, files go to the host's disk."""
        return self.memory_bytes - self.tmp_bytes if sandboxed else self.memory_bytes


@dataclass(frozen=True)
class Sandbox:
    """A bubblewrap that has proven to work here, and the seccomp filter
    (BPF) it loads."""

    bwrap: str
    seccomp: bytes


class _FdData:
    """What bwrap reads from fds: blob i goes onto fd FIRST_DATA_FD + i (the
    limiter puts it there; fds cannot cross close_fds and the re-exec)."""

    def __init__(self) -> None:
        self.blobs: list[bytes] = []

    def add(self, data: bytes) -> str:
        self.blobs.append(data)
        return str(FIRST_DATA_FD + len(self.blobs) - 1)


class _Folders:
    """The folders made so far inside the sandbox. bwrap would make the ones
    above a mount point as 0700, where nobody could not pass: these are 0755."""

    def __init__(self) -> None:
        self._made = {"/"}

    def add(self, path: str) -> None:
        self._made.add(path)

    def above(self, path: str) -> list[str]:
        argv: list[str] = []
        parents = []
        parent = os.path.dirname(path)
        while parent not in self._made:
            parents.append(parent)
            parent = os.path.dirname(parent)
        for folder in reversed(parents):
            argv += ["--perms", "0755", "--dir", folder]
            self._made.add(folder)
        return argv


def bwrap_argv(
    sandbox: Sandbox,
    command: Sequence[str],
    tmp_bytes: int,
    files: Mapping[str, bytes] | None = None,
) -> tuple[list[str], list[bytes]]:
    """bwrap's argv for `command`, with `files` ({path inside: content}) put
    in read-only; and the data its fds must carry (see limited_argv)."""
    fds = _FdData()
    made = _Folders()
    argv = [sandbox.bwrap, *_system_argv(made), *_etc_argv(fds, made)]
    argv += ["--perms", "01777", "--size", str(tmp_bytes), "--tmpfs", "/tmp"]
    made.add("/tmp")
    argv += _dev_argv(made)
    argv += ["--proc", "/proc"]
    made.add("/proc")
    for path in _runtime_paths():
        argv += [*made.above(path), "--ro-bind", os.path.realpath(path), path]
    for inside, content in (files or {}).items():
        argv += [*made.above(inside), "--perms", "0644", "--ro-bind-data", fds.add(content), inside]
    # In a user namespace bwrap's tmpfs at / and /dev belong to the sandbox's
    # uid, and have no size: nothing may be written there.
    argv += ["--remount-ro", "/dev", "--remount-ro", "/"]
    argv += ["--seccomp", fds.add(sandbox.seccomp)]
    argv += ["--chdir", "/tmp", "--die-with-parent", "--new-session", *_identity_argv()]
    return argv + list(command), fds.blobs


def _system_argv(made: _Folders) -> list[str]:
    argv: list[str] = []
    for path in SYSTEM_PATHS:
        if os.path.islink(path):
            argv += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            argv += ["--ro-bind", path, path]
            made.add(path)
    return argv


def _etc_argv(fds: _FdData, made: _Folders) -> list[str]:
    argv = ["--perms", "0755", "--dir", "/etc"]
    made.add("/etc")
    for path in ETC_PATHS:
        if os.path.islink(path):  # localtime: a link into /usr/share/zoneinfo
            argv += ["--symlink", os.readlink(path), path]
        elif os.path.exists(path):
            argv += ["--ro-bind", path, path]
    for path, text in (("/etc/passwd", PASSWD), ("/etc/group", GROUP)):
        argv += ["--perms", "0644", "--ro-bind-data", fds.add(text.encode()), path]
    return argv


def _dev_argv(made: _Folders) -> list[str]:
    """A /dev like bwrap's --dev, but with /dev/shm a link to /tmp: shared
    memory (multiprocessing's semaphores) then fits /tmp's size. No ptys."""
    argv = ["--perms", "0755", "--tmpfs", "/dev"]
    made.add("/dev")
    for node in ("null", "zero", "full", "random", "urandom", "tty"):
        argv += ["--dev-bind-try", f"/dev/{node}", f"/dev/{node}"]
    argv += ["--symlink", "/proc/self/fd", "/dev/fd"]
    for fd, name in enumerate(("stdin", "stdout", "stderr")):
        argv += ["--symlink", f"/proc/self/fd/{fd}", f"/dev/{name}"]
    return argv + ["--symlink", "/tmp", "/dev/shm"]


def _runtime_paths() -> list[str]:
    """The interpreter's prefixes, as it names them, outside the system
    folders (a venv, a pyenv): each shown at that path, read-only."""
    candidates = {
        sys.prefix,
        sys.base_prefix,
        sys.exec_prefix,
        sys.base_exec_prefix,
        os.path.dirname(os.path.realpath(sys.executable)),
    }
    system = tuple(p + "/" for p in SYSTEM_PATHS)
    paths = sorted(os.path.abspath(p) for p in candidates)
    for p in list(paths):
        real = os.path.realpath(p)
        if real != p:
            paths.append(real)  # a link's target is where its files are looked up
    paths = sorted(p for p in set(paths) if not (p + "/").startswith(system))
    # Drop paths already covered by a shorter one.
    return [p for i, p in enumerate(paths) if not any(p.startswith(q + "/") for q in paths[:i])]


def _identity_argv() -> list[str]:
    if os.geteuid() == 0:
        # As root, bwrap would map the sandbox's uid onto root outside, and the
        # code would own every root-owned file it can see. So no user
        # namespace: the code starts as root with only the capabilities it
        # needs to drop every capability and become nobody, for real. Nested
        # user namespaces are then refused by the seccomp filter.
        return [
            "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts",
            "--unshare-cgroup-try",
            "--cap-drop", "ALL",
            "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_SETPCAP",
            "--", sys.executable, "-I", "-S", "-c", _BECOME_NOBODY, str(SANDBOX_UID),
        ]  # fmt: skip
    # Not root: an unprivileged uid in a user namespace of its own, which may
    # not make another.
    return [
        "--unshare-all",
        "--unshare-user", "--disable-userns",
        "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID),
        "--cap-drop", "ALL",
        "--",
    ]  # fmt: skip


# Runs first inside a sandbox started by root: empties the bounding set (while
# it still has CAP_SETPCAP), becomes nobody (which clears the permitted,
# effective and ambient sets), clears the inheritable set, checks that no
# capability is left, then execs the real command. prctl takes unsigned longs.
_BECOME_NOBODY = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
def check(result, what):
    if result != 0:
        sys.exit(f"sandbox: {what} failed: {os.strerror(ctypes.get_errno())}")
def prctl(*args):
    return libc.prctl(*(ctypes.c_ulong(a) for a in args), *[ctypes.c_ulong(0)] * (5 - len(args)))
with open("/proc/sys/kernel/cap_last_cap") as f:
    last_cap = int(f.read())
for cap in range(last_cap + 1):
    check(prctl(24, cap), "PR_CAPBSET_DROP")
uid = int(sys.argv[1])
os.setgroups([])
os.setgid(uid)
os.setuid(uid)
header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
check(libc.capset(header, (ctypes.c_uint32 * 6)()), "capset")
check(prctl(47, 4), "PR_CAP_AMBIENT_CLEAR_ALL")
check(prctl(38, 1), "PR_SET_NO_NEW_PRIVS")
with open("/proc/self/status") as f:
    left = [line.strip() for line in f if line.startswith("Cap") and int(line.split()[1], 16)]
if left:
    sys.exit(f"sandbox: capabilities are left: {left}")
os.execvp(sys.argv[2], sys.argv[2:])
"""


# Sets the rlimits, puts the data bwrap reads from fds in place, then execs
# the real command (so no process stays behind). A separate interpreter does
# this because the gateway is multi-threaded (gRPC): a preexec_fn there runs
# Python between fork and exec, which can crash or deadlock the child. The
# limits hold for bwrap and everything below it.
_LIMIT_THEN_EXEC = """
import binascii, os, resource as r, sys
cpu, memory, files, fsize, nproc = map(int, sys.argv[1:6])
cgroup, blobs = sys.argv[6:8]
if cgroup != "-":
    with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))
for fd, blob in enumerate(blobs.split(",") if blobs else [], int(sys.argv[8])):
    data = os.memfd_create("bwrap-data", 0)
    with open(data, "wb", closefd=False) as f:
        f.write(binascii.a2b_base64(blob))
    os.lseek(data, 0, os.SEEK_SET)
    if data != fd:
        os.dup2(data, fd)
        os.close(data)
r.setrlimit(r.RLIMIT_CPU, (cpu, cpu + 1))
r.setrlimit(r.RLIMIT_AS, (memory, memory))
r.setrlimit(r.RLIMIT_NOFILE, (files, files))
r.setrlimit(r.RLIMIT_FSIZE, (fsize, fsize))
r.setrlimit(r.RLIMIT_NPROC, (nproc, nproc))
os.execvp(sys.argv[9], sys.argv[9:])
"""


def limited_argv(
    limits: Limits,
    command: Sequence[str],
    cgroup: str = "",
    blobs: Sequence[bytes] = (),
    sandboxed: bool = False,
) -> list[str]:
    """`command` under the rlimits, inside `cgroup` when given, with blob i
    readable on fd FIRST_DATA_FD + i. The soft CPU limit sends SIGXCPU
    (fatal); the hard one, a second later, SIGKILL."""
    values = (
        limits.cpu_seconds,
        limits.address_space(sandboxed),
        limits.open_files,
        limits.file_size_bytes,
        UID_PROCESS_LIMIT,
    )
    data = ",".join(base64.b64encode(b).decode() for b in blobs)
    return [
        sys.executable, "-I", "-S", "-c", _LIMIT_THEN_EXEC, *map(str, values), cgroup or "-",
        data, str(FIRST_DATA_FD), *command,
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
    files: Mapping[str, bytes] | None = None,
) -> asyncio.subprocess.Process:
    """Starts `command` with pipes on fds 0-2 and the rlimits, sandboxed when
    `sandbox` is set (cwd then means the sandbox's own /tmp, and `files` are
    put in read-only), in `cgroup` when given. The process leads a new
    session, so its process group can be killed as one."""
    argv, blobs = list(command), []
    if sandbox:
        argv, blobs = bwrap_argv(sandbox, command, limits.tmp_bytes, files)
    return await asyncio.create_subprocess_exec(
        *limited_argv(limits, argv, cgroup, blobs, sandboxed=sandbox is not None),
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
    limits = Limits(cpu_seconds=10, memory_bytes=1 << 30, tmp_bytes=PROBE_TMP_BYTES)
    command, blobs = bwrap_argv(sandbox, [sys.executable, "-I", "-S", "-c", ""], limits.tmp_bytes)
    proc = await asyncio.create_subprocess_exec(
        *limited_argv(limits, command, blobs=blobs, sandboxed=True),
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
        try:
            sandbox = Sandbox(bwrap, seccomp_filter())
            problem = await _probe(sandbox)
        except SeccompUnavailable as e:
            problem = f"{e}; install it (apt-get install libseccomp2)"
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
