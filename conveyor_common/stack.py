"""Runs the three services locally as separate processes (`make run/up/down`).

    python -m conveyor_common.stack run   # start, wait for health, one real request, stop
    python -m conveyor_common.stack up    # start and leave running (pids in .cache/stack)
    python -m conveyor_common.stack down  # stop what `up` started

Logs go to .cache/stack/<service>.log.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from conveyor_common.defaults import (
    GATEWAY_PORT,
    SCHEDULER_HTTP_PORT,
    SCHEDULER_PORT,
    WORKER_PORT,
)
from conveyor_common.healthcheck import check

STATE_DIR = Path(".cache/stack")
PIDS = STATE_DIR / "pids.json"


@dataclass(frozen=True)
class Service:
    name: str
    module: str
    port: int
    args: tuple[str, ...] = ()
    python: str = ""  # the interpreter to run it with ("": this one)
    health_port: int = 0  # where health is checked in plaintext (0: port)

    @property
    def probe_port(self) -> int:
        return self.health_port or self.port


def colocated_worker_args() -> tuple[str, ...]:
    """The worker's torch threads when all three services share this host:
    decode steps leave the tools a core, since a tool busy on every core
    stalls torch's threads at each kernel's barrier (measured on 2 cores: one
    busy process cut decoding from 17 to 6 tok/s at 2 threads, not at 1).
    Prefills, compute-bound and short, take every core (1.9x faster on 2)."""
    cores = len(os.sched_getaffinity(0))
    return ("--threads", str(max(1, cores - 1)), "--prefill-threads", str(cores))


WORKER_ARGS = colocated_worker_args()

SERVICES = (
    Service("llm_worker", "llm_worker", WORKER_PORT, WORKER_ARGS),
    Service("tool_gateway", "tool_gateway", GATEWAY_PORT),
    Service(
        "scheduler",
        "scheduler",
        SCHEDULER_PORT,
        (
            "--worker-target",
            f"dns:///localhost:{WORKER_PORT}",
            "--gateway-target",
            f"dns:///localhost:{GATEWAY_PORT}",
            "--http-port",
            str(SCHEDULER_HTTP_PORT),
        ),
    ),
)


def _say(text: str) -> None:
    print(f"[stack] {text}", flush=True)


def start(services: tuple[Service, ...] = SERVICES, state_dir: Path = STATE_DIR) -> dict[str, int]:
    """Starts the services as separate processes, logging to state_dir."""
    for service in services:
        if check(service.port, timeout=0.5).status != "UNAVAILABLE":
            sys.exit(
                f"port {service.port} ({service.name}) is already in use: "
                "run `make down`, or stop what holds it"
            )
    state_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "LOG_FORMAT": os.environ.get("LOG_FORMAT", "console")}
    pids = {}
    for service in services:
        log = open(state_dir / f"{service.name}.log", "w")
        process = subprocess.Popen(
            [
                service.python or sys.executable,
                "-m",
                service.module,
                "--host",
                "127.0.0.1",
                "--port",
                str(service.port),
                *service.args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # Ctrl-C in `make run` reaches us, not them
        )
        pids[service.name] = process.pid
        _say(f"started {service.name} (pid {process.pid}, port {service.port})")
    (state_dir / PIDS.name).write_text(json.dumps(pids))
    return pids


def wait_healthy(
    pids: dict[str, int],
    timeout: float = 600.0,
    services: tuple[Service, ...] = SERVICES,
    state_dir: Path = STATE_DIR,
) -> None:
    deadline = time.monotonic() + timeout
    waiting = {s.name: s for s in services}
    last_note = 0.0
    while waiting:
        for name, service in list(waiting.items()):
            if not _alive(pids[name]):
                tail = (state_dir / f"{name}.log").read_text()[-2000:]
                stop(pids, state_dir=state_dir)
                sys.exit(f"{name} exited during start-up; its log ends with:\n{tail}")
            if check(service.probe_port, timeout=1.0).serving:
                _say(f"{name} is serving")
                del waiting[name]
        if time.monotonic() > deadline:
            stop(pids, state_dir=state_dir)
            sys.exit(f"timed out waiting for {', '.join(waiting)}")
        if waiting and time.monotonic() - last_note > 10:
            note = (
                " (the first start converts the model once, ~30-60 s)"
                if "llm_worker" in waiting
                else ""
            )
            _say(f"waiting for {', '.join(waiting)}{note}")
            last_note = time.monotonic()
        time.sleep(0.5)


def _alive(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:  # not our child (started by `up`): probe it
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False


def stop(pids: dict[str, int], grace: float = 10.0, state_dir: Path = STATE_DIR) -> None:
    for name, pid in reversed(list(pids.items())):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        deadline = time.monotonic() + grace
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
        _say(f"stopped {name}")
    (state_dir / PIDS.name).unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["run", "up", "down"])
    args = parser.parse_args()
    if args.command == "down":
        if not PIDS.exists():
            _say("nothing to stop")
            return
        stop(json.loads(PIDS.read_text()))
        return
    pids = start()
    wait_healthy(pids)
    if args.command == "up":
        _say(
            f"up: scheduler on localhost:{SCHEDULER_PORT} (gRPC) and "
            f"http://localhost:{SCHEDULER_HTTP_PORT}/v1 (OpenAI API); `make down` stops it"
        )
        return
    from conveyor_common.cli import DEFAULT_PROMPT, run_once

    try:
        _say(f"request: {DEFAULT_PROMPT}")
        finished = asyncio.run(run_once(f"localhost:{SCHEDULER_PORT}", DEFAULT_PROMPT))
        if finished is None:
            sys.exit("the run ended without a RunFinished event")
    finally:
        stop(pids)


if __name__ == "__main__":
    main()
