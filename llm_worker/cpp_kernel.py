"""Builds the worker's C++ kernels (llm_worker/kernels/*.cpp) once per
machine into the conveyor cache, and loads them; None where one does not
build, so its caller keeps torch's own op.

The build needs a C++ compiler and ninja (both installed by `make`); it takes
~25 s on first use. A build is keyed by the sources (the .cpp and the headers
beside it), the flags, torch's and Python's versions and this CPU's flags, so
a copied cache on another CPU builds again rather than loading code for
instructions it lacks.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import platform
import shutil
import sys
import threading
from pathlib import Path
from types import ModuleType

import structlog

from llm_worker.model_cache import cache_root

log = structlog.get_logger("engine")

KERNELS = Path(__file__).with_name("kernels")
CFLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp")

_lock = threading.Lock()
_built: dict[Path, ModuleType | None] = {}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_key(source: Path) -> str:
    """What the built library depends on, hashed."""
    import torch

    h = hashlib.sha256(source.read_bytes())
    for header in sorted(source.parent.glob("*.h")):
        h.update(header.read_bytes())
    for part in (*CFLAGS, torch.__version__, sys.version, _cpu_flags()):
        h.update(part.encode())
    return h.hexdigest()[:16]


def load(source: Path, cache_dir: str = "") -> ModuleType | None:
    """The built extension of `source`, built on first use; None (and a
    logged reason) when it cannot be built or loaded here."""
    name = source.stem
    with _lock:
        try:
            where = cache_root(cache_dir) / "kernels" / f"{name}-{build_key(source)}"
        except OSError as e:  # the source did not ship
            log.warning("kernel unavailable; torch's op serves", kernel=name, error=str(e))
            return None
        if where not in _built:
            _built[where] = _build(name, source, where)
        return _built[where]


def built_at(name: str) -> Path | None:
    """Where a loaded kernel of this name was built (for tests)."""
    return next(
        (p for p, m in _built.items() if m is not None and p.name.startswith(f"{name}-")), None
    )


def _build(name: str, source: Path, where: Path) -> ModuleType | None:
    try:
        from torch.utils import cpp_extension

        _put_ninja_on_path()
        where.mkdir(parents=True, exist_ok=True)
        # Workers starting together build once: they queue on this flock,
        # which the OS releases when its holder dies. cpp_extension's own lock
        # is a file that a killed build leaves behind, and it waits on that
        # file forever; under the flock no one else is building, so a file
        # found there is such a leftover.
        with open(where / "build.flock", "w") as held:
            fcntl.flock(held, fcntl.LOCK_EX)
            (where / "lock").unlink(missing_ok=True)
            module = cpp_extension.load(
                name=f"conveyor_{name}_{where.name.rsplit('-', 1)[-1]}",
                sources=[str(source)],
                extra_cflags=list(CFLAGS),
                extra_ldflags=["-fopenmp"],
                build_directory=str(where),
                verbose=False,
            )
        log.info("kernel ready", kernel=name, path=str(where))
        return module
    except Exception as e:  # no compiler, no ninja, a failed build: torch's op serves
        log.warning(
            "kernel unavailable; torch's op serves",
            kernel=name,
            error=f"{type(e).__name__}: {str(e)[-500:]}",
        )
        return None


def _put_ninja_on_path() -> None:
    """torch runs `ninja` from PATH; pip's ninja lives in the venv, which a
    worker started as .venv/bin/python does not have on PATH."""
    if shutil.which("ninja"):
        return
    try:
        import ninja
    except ImportError:
        return  # the build then says ninja is missing
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
