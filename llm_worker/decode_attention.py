"""The lean decode step's attention on CPU: a C++ kernel
(llm_worker/kernels/decode_attention.cpp) built once per machine, or torch's
SDPA where the kernel does not build or apply.

One query per row is a shape torch's CPU SDPA serves poorly: on a 2-core
Xeon, 16 rows of SmolLM2 at ~340 real columns (~570 padded) took ~18 ms a
step in bf16 and ~32 ms in float32 over the 30 layers; the kernel took ~8 and
~14 ms, reading only each row's real columns and each kv head once for its
query heads (bench: bench/worker/decode_attention.py).

The build needs a C++ compiler and ninja (both installed by `make`); it takes
~25 s on first use and lands in the conveyor cache, keyed by the source, the
flags, torch's version and this CPU's flags, so a copied cache on another CPU
builds again rather than loading code for instructions it lacks.
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
from typing import Protocol

import structlog
import torch

from llm_worker.model_cache import cache_root

log = structlog.get_logger("engine")

SOURCE = Path(__file__).with_name("kernels") / "decode_attention.cpp"
CFLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp")
HEAD_DIMS = (64, 128)
MAX_GROUP = 16  # query heads per kv head (kMaxGroup in the source)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class Kernel(Protocol):
    def __call__(
        self,
        q: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        starts: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """q [rows, heads, dim]; keys, values [rows, kv_heads, columns, dim];
        starts [rows] int64, each row's first real column. Returns [rows,
        heads, dim]."""


_lock = threading.Lock()
_built: dict[Path, Kernel | None] = {}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_key() -> str:
    """What the built library depends on, hashed."""
    h = hashlib.sha256(SOURCE.read_bytes())
    for part in (*CFLAGS, torch.__version__, sys.version, _cpu_flags()):
        h.update(part.encode())
    return h.hexdigest()[:16]


def load_kernel(cache_dir: str = "") -> Kernel | None:
    """The kernel, built on first use; None (and a logged reason) when it
    cannot be built or loaded here."""
    with _lock:
        try:
            where = cache_root(cache_dir) / "kernels" / f"decode_attention-{build_key()}"
        except OSError as e:  # the source did not ship
            log.warning(
                "decode attention kernel unavailable; SDPA serves decode steps", error=str(e)
            )
            return None
        if where not in _built:
            _built[where] = _build(where)
        return _built[where]


def _build(where: Path) -> Kernel | None:
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
                name=f"conveyor_decode_attention_{where.name.rsplit('-', 1)[-1]}",
                sources=[str(SOURCE)],
                extra_cflags=list(CFLAGS),
                extra_ldflags=["-fopenmp"],
                build_directory=str(where),
                verbose=False,
            )
        log.info("decode attention kernel ready", path=str(where))
        return module.decode_attention
    except Exception as e:  # no compiler, no ninja, a failed build: SDPA serves
        log.warning(
            "decode attention kernel unavailable; SDPA serves decode steps",
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


def unsupported_reason(weight: torch.Tensor, head_dim: int, groups: int) -> str:
    """Why the kernel does not apply to this model ("" when it does)."""
    if weight.device.type != "cpu":
        return f"device {weight.device.type}"
    if weight.dtype not in DTYPES:
        return f"dtype {weight.dtype}"
    if head_dim not in HEAD_DIMS:
        return f"head dim {head_dim}"
    if groups > MAX_GROUP:
        return f"{groups} query heads per kv head"
    return ""


def row_starts(mask: torch.Tensor | None, rows: int) -> torch.Tensor | None:
    """Each row's first real column, from a step's padding mask [rows,
    columns] (1 = real); zeros when nothing is padded. None when the mask is
    not left padding (a real column after a padded one), which the kernel
    cannot skip: the caller masks through SDPA then."""
    if mask is None:
        return torch.zeros(rows, dtype=torch.long)
    seen = mask.bool()
    columns = seen.shape[1]
    starts = columns - seen.sum(-1)
    left_padded = torch.arange(columns, device=mask.device)[None, :] >= starts[:, None]
    if not torch.equal(seen, left_padded) or bool((starts >= columns).any()):
        return None
    return starts.to(device="cpu", dtype=torch.long).contiguous()
