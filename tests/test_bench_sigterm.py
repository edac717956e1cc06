"""A bench stopped with SIGTERM stops the worker processes it started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A bench in miniature: a worker process held in a with-block under asyncio.run.
_BENCH = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from bench.worker.servers import Subprocess, stop_workers_on_sigterm

    async def run(log):
        worker = [sys.executable, "-c", "import time; time.sleep(120)"]
        with Subprocess(worker, log, "a sleeping worker") as proc:
            print(proc.proc.pid, flush=True)
            await asyncio.sleep(120)

    if sys.argv[2] == "handled":
        stop_workers_on_sigterm()
    asyncio.run(run(Path(sys.argv[1])))
    """
)


def _child_after_sigterm(tmp_path: Path, mode: str) -> bool:
    """Whether the bench's worker is still alive after the bench got SIGTERM."""
    bench = subprocess.Popen(
        [sys.executable, "-c", _BENCH, str(tmp_path / f"{mode}.log"), mode],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    child = int(bench.stdout.readline())
    bench.send_signal(signal.SIGTERM)
    bench.wait(30)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return False
        if _zombie(child):
            return False
        time.sleep(0.1)
    os.kill(child, signal.SIGKILL)
    return True


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return False


def test_sigterm_stops_the_bench_workers(tmp_path):
    assert _child_after_sigterm(tmp_path, "handled") is False


def test_without_the_handler_the_worker_outlives_the_bench(tmp_path):
    """What the handler is for: Python's default SIGTERM skips the with-block."""
    assert _child_after_sigterm(tmp_path, "default") is True
