"""The seccomp filter of the sandbox: kernel interfaces an interpreter does
not need fail with EPERM (Python raises PermissionError, a clear error), and a
system call of another architecture (32-bit x86 on x86-64, x32) kills the
process. Everything else is allowed: the filter narrows the kernel's attack
surface, while the namespaces, the uid and the mounts do the confining.

Built with libseccomp (through pyseccomp, a ctypes wrapper over the system's
libseccomp.so.2) once per gateway, and handed to bubblewrap as BPF.
"""

from __future__ import annotations

import errno
import functools
import tempfile

DENIED_SYSCALLS = (
    # New namespaces and mounts: the way to a root of one's own.
    "unshare", "setns", "mount", "umount2", "pivot_root", "chroot", "move_mount",
    "open_tree", "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
    # Large kernel interfaces with a history of exploits.
    "io_uring_setup", "io_uring_enter", "io_uring_register", "bpf", "userfaultfd",
    "perf_event_open", "keyctl", "add_key", "request_key",
    # Reading or steering other processes.
    "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd",
    # The machine's business, not an interpreter's.
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "reboot", "swapon", "swapoff", "acct", "quotactl", "quotactl_fd", "syslog",
    "open_by_handle_at",
)  # fmt: skip

# clone() flags that make namespaces (its first argument on x86-64 and arm64;
# s390 swaps the first two). glibc's fork and threads never use them.
NAMESPACE_FLAGS = (
    0x00020000,  # CLONE_NEWNS
    0x02000000,  # CLONE_NEWCGROUP
    0x04000000,  # CLONE_NEWUTS
    0x08000000,  # CLONE_NEWIPC
    0x10000000,  # CLONE_NEWUSER
    0x20000000,  # CLONE_NEWPID
    0x40000000,  # CLONE_NEWNET
)
PERSONALITY_QUERY = 0xFFFFFFFF  # personality(0xffffffff) reads it and changes nothing


class SeccompUnavailable(RuntimeError):
    """libseccomp (or pyseccomp) is missing, or cannot build the filter."""


@functools.cache
def seccomp_filter() -> bytes:
    """The filter as BPF, for bwrap's --seccomp."""
    try:
        import pyseccomp as sc  # loads libseccomp.so.2; raises when it is missing
    except (ImportError, RuntimeError, OSError) as e:
        raise SeccompUnavailable(f"libseccomp is unavailable ({e})") from e
    deny = sc.ERRNO(errno.EPERM)
    try:
        f = sc.SyscallFilter(defaction=sc.ALLOW)
        f.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)
        for name in DENIED_SYSCALLS:
            if sc.resolve_syscall(sc.Arch.NATIVE, name) >= 0:  # unknown here: cannot be called
                f.add_rule(deny, name)
        for flag in NAMESPACE_FLAGS:
            f.add_rule(deny, "clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
        # clone3 passes its flags in memory, where a filter cannot look: ENOSYS
        # makes glibc fall back to clone, whose flags the rules above check.
        f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
        # Personality flags turn off ASLR or make data executable: only queries.
        f.add_rule(deny, "personality", sc.Arg(0, sc.NE, PERSONALITY_QUERY))
        with tempfile.TemporaryFile() as out:
            f.export_bpf(out)
            out.seek(0)
            return out.read()
    except OSError as e:
        raise SeccompUnavailable(f"libseccomp could not build the filter ({e})") from e
