"""Whether packed float32 linears pay on this CPU, measured on the model.

The same packing ran float32 decode steps ×1.4–1.7 faster on a 2-core AMD
EPYC and slower on a Xeon, so `--pack-linears auto` does not guess: it times
decode steps of the loaded model both ways, interleaved, at 1 and 8 rows,
and keeps the packing when it is at least `MIN_GAIN` faster overall. That
takes a few seconds, once: the verdict is stored under the cache directory,
keyed by what decides it (CPU, torch, threads, dtype, the linears' shapes).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from pathlib import Path

import structlog
import torch

from llm_worker.model_cache import cache_root
from llm_worker.packed_linear import Toggle

log = structlog.get_logger("loader")

PROBE_ROWS = (1, 8)  # one stream, and a batch
PROBE_CONTEXT = 32  # prompt tokens before the timed steps
ROUNDS = 4  # each round times both ways, in alternating order
STEPS = 3  # timed decode steps per way per round; the fastest counts
MIN_GAIN = 1.05  # geometric mean over PROBE_ROWS; within noise, stay plain
VERDICTS = "linear-packing.json"


def _cpu_identity() -> str:
    """The CPU's model name and feature flags (what the kernels dispatch on)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        import platform

        return platform.processor() or platform.machine()
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return f"{fields.get('model name', '')}|{fields.get('flags', fields.get('Features', ''))}"


def verdict_key(model: torch.nn.Module) -> str:
    """What the verdict depends on; another model of the same shapes shares it."""
    shapes = sorted(
        {
            (m.in_features, m.out_features)
            for m in model.modules()
            if isinstance(m, torch.nn.Linear) and m.weight.dtype == torch.float32
        }
    )
    parts = [_cpu_identity(), torch.__version__, str(torch.get_num_threads()), str(shapes)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def _read(path: Path) -> dict:
    """Stored verdicts; a missing or unreadable file is no verdicts."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write(path: Path, verdicts: dict) -> None:
    """Atomically: a concurrent reader sees the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".linear-packing-")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(verdicts, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def measure(model: torch.nn.Module, toggle: Toggle) -> dict[int, float]:
    """rows -> (fastest plain step) / (fastest packed step), on this model.
    Leaves the model plain."""
    vocab = int(model.config.vocab_size)
    device = next(model.parameters()).device
    speedups = {}
    with torch.inference_mode():
        for rows in PROBE_ROWS:
            toggle(False)
            # Any tokens will do: the time of a step does not depend on them.
            ids = torch.arange(rows * PROBE_CONTEXT, device=device).reshape(rows, -1) % vocab
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
    toggle(False)
    return speedups


def packing_pays(model: torch.nn.Module, toggle: Toggle, cache_dir: str = "") -> bool:
    """The stored verdict for this CPU and model shape, or a new measurement
    (stored). A `pack_linears` Decide."""
    toggle(False)  # the key reads the plain linears
    path = cache_root(cache_dir) / VERDICTS
    key = verdict_key(model)
    stored = _read(path).get(key)
    if isinstance(stored, dict) and isinstance(stored.get("pack"), bool):
        log.info("float32 packing verdict reused", pack=stored["pack"], file=str(path))
        return stored["pack"]
    start = time.perf_counter()
    speedups = measure(model, toggle)
    gain = math.exp(sum(math.log(s) for s in speedups.values()) / len(speedups))
    pack = gain >= MIN_GAIN
    log.info(
        "float32 packing measured",
        pack=pack,
        speedup={str(rows): round(s, 3) for rows, s in speedups.items()},
        seconds=round(time.perf_counter() - start, 1),
    )
    verdicts = _read(path)
    verdicts[key] = {"pack": pack, "speedup": {str(r): s for r, s in speedups.items()}}
    try:
        _write(path, verdicts)
    except OSError as e:  # a read-only cache measures again next start; no harm
        log.warning("could not store the packing verdict", file=str(path), error=str(e))
    return pack
