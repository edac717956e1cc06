"""Data files the gateway builds once from what ships with Python and its
packages (the search index, the sample database) and keeps in the cache.

A file's name carries a hash of its builder's source and of the interpreter,
so a change to either makes a new file instead of reusing a stale one. It is
built into a temporary file under a lock, in a child interpreter (imports with
side effects stay out of the gateway), then moved into place: concurrent
gateways on one cache build it once, and a failed build leaves nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

BUILD_TIMEOUT_S = 300.0
STDERR_TAIL_CHARS = 2000


class BuildError(RuntimeError):
    """A cached file could not be built."""


def cache_dir() -> Path:
    configured = os.environ.get("CONVEYOR_CACHE_DIR", "")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "conveyor"


def versioned_path(
    builder: str | os.PathLike,
    folder: str,
    stem: str,
    extra: str = "",
    root: str | os.PathLike | None = None,
) -> Path:
    """<root>/<folder>/<stem>-<python version>-<hash>.sqlite, the hash over
    the builder's source, the interpreter and `extra`."""
    digest = hashlib.sha256()
    digest.update(Path(builder).read_bytes())
    digest.update(f"{sys.version}|{sys.platform}|{sys.base_prefix}|{extra}".encode())
    version = ".".join(map(str, sys.version_info[:3]))
    base = Path(root) if root is not None else cache_dir()
    return base / folder / f"{stem}-{version}-{digest.hexdigest()[:12]}.sqlite"


def ensure_built(path: Path, build: Callable[[Path], None], mode: int = 0o644) -> Path:
    """`path`, built first by `build(tmp)` if it is missing. Blocking (call
    it in a thread from async code)."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / ".build.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if path.exists():  # another process built it while we waited
            return path
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".tmp")
        os.close(fd)
        try:
            build(Path(tmp))
            os.chmod(tmp, mode)  # mkstemp made it private; other gateways read it
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    return path


def build_in_child(script: str | os.PathLike, out: Path, what: str) -> None:
    """Runs `script --build-into out` in an isolated child interpreter;
    raises BuildError naming `what` when it fails or overruns."""
    command = [sys.executable, "-I", "-W", "ignore", str(Path(script).resolve())]
    try:
        done = subprocess.run(
            [*command, "--build-into", str(out)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=BUILD_TIMEOUT_S,
            cwd=out.parent,
        )
    except subprocess.TimeoutExpired:
        raise BuildError(f"building {what} took over {BUILD_TIMEOUT_S:g} s") from None
    if done.returncode != 0:
        tail = done.stderr.strip()[-STDERR_TAIL_CHARS:]
        raise BuildError(f"building {what} failed (exit {done.returncode}):\n{tail}")
