"""Servers the worker benchmarks (and the vLLM tests) start as processes of
their own: a worker on some engine, vLLM's OpenAI server, a peer engine. Each
logs to a file, fails with that log's tail when it dies, and is stopped on
exit."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STARTUP_SECONDS = 900  # vLLM's first start compiles the model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_workers_on_sigterm() -> None:
    """A SIGTERM ends a bench as Ctrl-C does: the with-blocks holding its
    worker processes unwind and stop them. (Python's default SIGTERM exits
    at once, and a killed bench left its workers running.)"""
    signal.signal(signal.SIGTERM, signal.default_int_handler)


class Subprocess:
    """`argv` run from the repository root, with gen/ and the project on its
    path, its output in `log`."""

    def __init__(self, argv: list[str], log: Path, name: str, env: dict[str, str] | None = None):
        self.log, self.name = log, name
        env = {**os.environ, "PYTHONPATH": f"{ROOT / 'gen'}:{ROOT}", **(env or {})}
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
            )

    def check(self) -> None:
        """Raises with the log's tail when the process has exited."""
        if self.proc.poll() is not None:
            tail = self.log.read_text(errors="replace")[-4000:]
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{tail}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> Subprocess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


async def wait_serving(target: str, proc: Subprocess, timeout: float = STARTUP_SECONDS) -> None:
    """Waits for a gRPC server's health to say SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            proc.check()
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            await asyncio.sleep(1)
    raise RuntimeError(f"{proc.name} at {target} not serving after {timeout:g} s")


def wait_healthy(url: str, proc: Subprocess, timeout: float = STARTUP_SECONDS) -> None:
    """Waits for an HTTP server's /health to answer 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc.check()
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{proc.name} at {url} not healthy after {timeout:g} s")
