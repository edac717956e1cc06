"""Whether packed float32 linears pay on this CPU, measured on the model.

The same packing ran float32 decode steps ×1.1–1.2 faster at 1 row and
×1.4–1.7 at 4–16 rows on a 2-core AMD EPYC, and measured slower on a Xeon (with an
older batch hint), so `--pack-linears auto` does not guess: it times decode
steps of the loaded model both ways, interleaved, at 1 and 8 rows, and
keeps the packing when it is at least `MIN_GAIN` faster overall. That takes
about 50 decode steps, once: the verdict is stored in the cache directory,
keyed by what decides it (CPU, torch, threads, the linears' shapes, this
probe's version). Delete the file (or its entry) to measure again, e.g.
after a probe ran on a busy host.

Workers that share a cache (replicas on one volume) take the file's lock
for the whole decision: one measures, the rest wait and reuse its verdict,
and no two probes slow each other down.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import structlog
import torch

from llm_worker.model_cache import cache_root
from llm_worker.packed_linear import BATCH_HINT, Toggle

log = structlog.get_logger("loader")

PROBE_ROWS = (1, 8)  # one stream, and a batch
PROBE_CONTEXT = 32  # prompt tokens before the timed steps
ROUNDS = 4  # each round times both ways, in alternating order
STEPS = 3  # timed decode steps per way per round; the fastest counts
MIN_GAIN = 1.05  # geometric mean over PROBE_ROWS; within noise, stay plain
VERSION = f"1 hint={BATCH_HINT[torch.float32]} rows={PROBE_ROWS} gain={MIN_GAIN}"
VERDICTS = "linear-packing.json"
MAX_FILE_BYTES = 1 << 20  # a verdict file larger than this is not ours


def _umask() -> int:
    """The process's umask, read without setting it (os.umask would change
    it for every thread for a moment)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022


@functools.cache  # the CPU does not change while the process runs
def _cpu_identity() -> str:
    """The CPU's model name and feature flags (what the kernels dispatch on)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        import platform

        return platform.processor() or platform.machine()
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return f"{fields.get('model name', '')}|{fields.get('flags', fields.get('Features', ''))}"


def verdict_key(model: torch.nn.Module) -> str:
    """What the verdict depends on; another model of the same shapes shares
    it. Read off the plain float32 linears (the ones packing would replace)."""
    shapes = sorted(
        {
            (m.in_features, m.out_features)
            for m in model.modules()
            if type(m) is torch.nn.Linear and m.weight.dtype == torch.float32
        }
    )
    parts = [VERSION, _cpu_identity(), torch.__version__, str(torch.get_num_threads()), str(shapes)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def _read(path: Path) -> dict:
    """Stored verdicts; a missing, oversized or unreadable file is none."""
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            return {}
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def _write(path: Path, verdicts: dict) -> None:
    """Atomically: a reader sees the old file or the new one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".linear-packing-")
    try:
        # mkstemp makes it 0600; readable by the cache's other users, as the models are.
        os.fchmod(fd, 0o644 & ~_umask())
        with os.fdopen(fd, "w") as f:
            json.dump(verdicts, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def measure(model: torch.nn.Module, toggle: Toggle) -> dict[int, float]:
    """rows -> (fastest plain step) / (fastest packed step), on this model.
    Leaves the model plain, also when a step fails."""
    device = next(model.parameters()).device
    speedups = {}
    try:
        with torch.inference_mode():
            for rows in PROBE_ROWS:
                toggle(False)
                # Any tokens will do: a step's time does not depend on them.
                ids = torch.zeros((rows, PROBE_CONTEXT), dtype=torch.long, device=device)
                out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
                cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
                best = {False: math.inf, True: math.inf}
                for round_ in range(ROUNDS):
                    for packed in (False, True) if round_ % 2 == 0 else (True, False):
                        toggle(packed)
                        for _ in range(STEPS):
                            start = time.perf_counter()
                            out = model(input_ids=token, past_key_values=cache, use_cache=True)
                            best[packed] = min(best[packed], time.perf_counter() - start)
                            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
                speedups[rows] = best[False] / best[True]
    finally:
        toggle(False)
    return speedups


class Verdicts:
    """The stored verdicts of one cache directory; a `packed_linear.Probe`.
    The first use takes the directory's lock, held until `verdicts` exits,
    so a start that never asks (off, on, bf16 only, a GPU) never touches it."""

    def __init__(self, path: Path, stack: contextlib.ExitStack):
        self.path, self._stack, self._locked = path, stack, False

    def _lock(self) -> None:
        if self._locked:
            return
        self._locked = True
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            lock = self._stack.enter_context(open(self.path.parent / f".{VERDICTS}.lock", "w"))
        except OSError as e:  # a cache that cannot be written: measured each start, unlocked
            log.warning("packing verdicts not locked", file=str(self.path), error=str(e))
            return
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes

    def known(self, model: torch.nn.Module) -> bool | None:
        """The stored verdict for this model here, or None to measure."""
        self._lock()
        stored = _read(self.path).get(verdict_key(model))
        if isinstance(stored, dict) and isinstance(stored.get("pack"), bool):
            log.info("float32 packing verdict reused", pack=stored["pack"], file=str(self.path))
            return stored["pack"]
        return None

    def decide(self, model: torch.nn.Module, toggle: Toggle) -> bool:
        """Measures both ways and stores the verdict. The key is read with
        the model plain, as `known` reads it."""
        self._lock()
        toggle(False)
        key = verdict_key(model)
        start = time.perf_counter()
        speedups = measure(model, toggle)
        gain = math.exp(sum(math.log(s) for s in speedups.values()) / len(speedups))
        pack = gain >= MIN_GAIN
        log.info(
            "float32 packing measured",
            pack=pack,
            speedup={str(rows): round(s, 3) for rows, s in speedups.items()},
            seconds=round(time.perf_counter() - start, 1),
            file=str(self.path),
        )
        verdicts = _read(self.path)
        verdicts[key] = {"pack": pack, "speedup": {str(r): s for r, s in speedups.items()}}
        try:
            _write(self.path, verdicts)
        except OSError as e:  # a read-only cache measures again next start; no harm
            log.warning("could not store the packing verdict", file=str(self.path), error=str(e))
        return pack


@contextlib.contextmanager
def verdicts(cache_dir: str = "") -> Iterator[Verdicts]:
    """The cache's verdicts, locked from their first use to the end of the
    block (replicas on one cache wait and reuse the first one's measurement)."""
    with contextlib.ExitStack() as stack:
        yield Verdicts(cache_root(cache_dir) / VERDICTS, stack)
