"""The services as real processes (`python -m ...`): they come up healthy,
and SIGTERM stops them gracefully (health to NOT_SERVING, exit code 0)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conveyor_common.healthcheck import check


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(module: str, port: int, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", module, "--host", "127.0.0.1", "--port", str(port),
         "--metrics-port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "LOG_FORMAT": "json"},
    )  # fmt: skip


def wait_serving(process: subprocess.Popen, port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"exited early: {process.stdout.read().decode()[-2000:]}")
        if check(port, timeout=1.0).serving:
            return
        time.sleep(0.2)
    pytest.fail("never became SERVING")


@pytest.mark.parametrize(
    "module,args",
    [
        ("tool_gateway", ()),
        ("scheduler", ("--worker-target", "127.0.0.1:1", "--gateway-target", "127.0.0.1:1")),
        ("llm_worker", ()),  # the real default model, from the conversion cache
    ],
)
def test_serves_then_stops_gracefully_on_sigterm(module, args, default_model_dir):
    port = free_port()
    process = start(module, port, *args)
    try:
        wait_serving(process, port)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        log = process.stdout.read().decode()
        assert '"event": "stopping"' in log
        assert not check(port, timeout=1.0).serving
    finally:
        process.kill()
        process.wait()
