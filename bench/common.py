"""What every benchmark report shares: the machine it ran on, the date,
progress lines, and writing <out>.md and <out>.json."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO


def machine() -> dict:
    cpu_model = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), ""
            )
    except OSError:
        pass
    return {
        "processor": platform.processor(),
        "cpu_model": cpu_model,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
    }


def cpu_name(m: dict) -> str:
    """The CPU as a report names it, from `machine()`'s fields."""
    return m["cpu_model"] or m["processor"] or m["machine"]


def latency_summary(samples: list[float]) -> dict:
    """Seconds measured -> median and p90 in ms, and the count."""
    import statistics

    ordered = sorted(samples)
    return {
        "median_ms": 1000 * statistics.median(ordered),
        "p90_ms": 1000 * ordered[int(0.9 * (len(ordered) - 1))],
        "n": len(ordered),
    }


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()


def stdlib_docstrings(names: list[str]) -> list[str]:
    """The docstrings of these stdlib modules, stripped, in this order
    (empty ones left out): the benchmarks' real text."""
    import importlib

    docs = ((importlib.import_module(name).__doc__ or "").strip() for name in names)
    return [doc for doc in docs if doc]


def progress(name: str, stream: TextIO = sys.stderr) -> Callable[[str], None]:
    """A `say(msg)` that prints timestamped progress lines for a long run."""
    started = time.perf_counter()

    def say(msg: str) -> None:
        print(f"[{name} {time.perf_counter() - started:6.1f}s] {msg}", file=stream)
        stream.flush()

    return say


def write(results: dict, out: str | Path, markdown: str) -> tuple[Path, Path]:
    """Writes <out>.md and <out>.json; returns their paths."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    md_path, json_path = out.with_name(out.name + ".md"), out.with_name(out.name + ".json")
    md_path.write_text(markdown, encoding="utf-8")
    json_path.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return md_path, json_path


def publish(results: dict, out: str | Path, markdown: str) -> tuple[Path, Path]:
    """Writes <out>.md and <out>.json, prints the markdown, and says where
    the files went."""
    md_path, json_path = write(results, out, markdown)
    print(markdown, end="")
    print(f"wrote {md_path} and {json_path}", file=sys.stderr)
    return md_path, json_path


def kernel_bench_args(
    argv, prog: str, doc: str, rows: str, rounds: int, rows_help: str = ""
) -> tuple[list[int], int, str]:
    """The flags the kernel benches share (`--rows`, `--rounds`, `--quick`:
    rows 1 and 4, 2 rounds; `--out`); returns (rows, rounds, out)."""
    import argparse

    name = prog.rsplit(".", 1)[-1]
    ap = argparse.ArgumentParser(prog=f"python -m {prog}", description=doc.split("\n")[0])
    ap.add_argument("--rows", default=rows, help=rows_help or "rows per step, comma-separated")
    ap.add_argument("--rounds", type=int, default=rounds, help="alternating rounds per way")
    ap.add_argument("--quick", action="store_true", help="rows 1 and 4, 2 rounds")
    ap.add_argument("--out", default=f"bench/results/{name}", help="writes <out>.md and .json")
    args = ap.parse_args(argv)
    if args.quick:
        return [1, 4], 2, args.out
    try:
        return [int(r) for r in args.rows.split(",")], args.rounds, args.out
    except ValueError:
        ap.error(f"--rows: comma-separated counts, not {args.rows!r}")
        raise  # unreachable: error() exits
