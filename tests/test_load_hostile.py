"""Load with hostile requests among it: 64 concurrent runs through the three
services, one of them with a NaN temperature and one whose sandboxed code
forges protocol frames (a 1 GiB header, then junk). The NaN run is refused
with INVALID_ARGUMENT, the forging run's call fails alone with a SANDBOX
error, every other run completes with its own correct result and gap-free
events, and the gateway (a real process here, so its memory can be read)
stays under its documented memory bound."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time

import grpc
import pytest
from conveyor.v1 import common_pb2, conveyor_pb2, conveyor_pb2_grpc

from conveyor_common.server import stop_server
from tests.test_processes import free_port, wait_serving
from tool_gateway.tools.python_tool import session_memory_bound

RUNS = 64
OUTPUT_CAP = 64 * 1024
PARTIAL = conveyor_pb2.EXECUTION_MODE_PARTIAL

# Code that writes frames onto every fd the interpreter may hold for its
# protocol: a header declaring 1 GiB followed by 8 MB of junk.
FORGER = (
    "import os\n"
    "for fd in range(3, 256):\n"
    "    try:\n"
    "        os.write(fd, (1 << 30).to_bytes(4, 'big') + b'x' * (8 << 20))\n"
    "    except OSError:\n"
    "        pass\n"
    "print('forged')\n"
)


def completion(code: str) -> str:
    return f"```python\n{code}```\n"


def request(i: int) -> conveyor_pb2.RunRequest:
    code = FORGER if i == 1 else f"print({i} * 1000 + 7)\n"
    return conveyor_pb2.RunRequest(
        run_id=f"load-{i}",
        messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=f"run {i}")],
        mode=PARTIAL,
        forced_completions=[completion(code), "done"],
        max_rounds=2,
        sampling=common_pb2.SamplingParams(temperature=float("nan") if i == 0 else 0.0),
    )


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakRss:
    """Samples a process's resident memory every 20 ms in a thread."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes(self.pid))
            time.sleep(0.02)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


@pytest.fixture
def gateway_process():
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "tool_gateway", "--port", str(port), "--metrics-port", "0",
         "--output-cap", str(OUTPUT_CAP), "--unit-timeout", "60"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "LOG_FORMAT": "json"},
    )  # fmt: skip
    try:
        wait_serving(process, port)
        yield process, f"127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=30)


async def run(stub, i: int):
    try:
        return [e async for e in stub.Run(request(i), timeout=240)]
    except grpc.aio.AioRpcError as e:
        return e


@pytest.mark.timeout(600)
async def test_64_runs_with_a_nan_and_a_forger_among_them(worker, gateway_process):
    from scheduler.config import SchedulerConfig
    from scheduler.server import create_server

    process, gateway_target = gateway_process
    _, worker_target = worker
    scheduler, port = await create_server(
        SchedulerConfig(worker_target=worker_target, gateway_target=gateway_target)
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = conveyor_pb2_grpc.ConveyorServiceStub(channel)
            baseline = rss_bytes(process.pid)
            with PeakRss(process.pid) as rss:
                outcomes = await asyncio.gather(*(run(stub, i) for i in range(RUNS)))
    finally:
        await stop_server(scheduler, 0)

    nan = outcomes[0]
    assert isinstance(nan, grpc.aio.AioRpcError), nan
    assert nan.code() == grpc.StatusCode.INVALID_ARGUMENT and "temperature" in nan.details()

    forged = outcomes[1]
    assert not isinstance(forged, grpc.aio.AioRpcError), forged
    errors = [e.tool_call_finished.error for e in forged
              if e.WhichOneof("event") == "tool_call_finished"]  # fmt: skip
    assert len(errors) == 1 and errors[0].code == common_pb2.TOOL_ERROR_CODE_SANDBOX, errors
    assert forged[-1].run_finished.finish_reason == common_pb2.FINISH_REASON_FORCED_END

    for i, events in enumerate(outcomes[2:], start=2):
        assert not isinstance(events, grpc.aio.AioRpcError), (i, events)
        assert [e.sequence for e in events] == list(range(len(events))), f"run {i}: gaps"
        assert {e.run_id for e in events} == {f"load-{i}"}
        assert events[-1].WhichOneof("event") == "run_finished"
        assert events[-1].run_finished.finish_reason == common_pb2.FINISH_REASON_FORCED_END
        outputs = [e.tool_call_finished.result.output for e in events
                   if e.WhichOneof("event") == "tool_call_finished"]  # fmt: skip
        assert outputs == [str(i * 1000 + 7)], (i, outputs)

    bound = RUNS * session_memory_bound(OUTPUT_CAP)
    grew = rss.peak - baseline
    print(f"gateway RSS {baseline >> 20} MiB, +{grew >> 20} MiB at peak (bound {bound >> 20} MiB)")
    assert grew < bound, f"the gateway grew {grew >> 20} MiB; its bound is {bound >> 20} MiB"
