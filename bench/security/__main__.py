"""What TLS, tokens and tracing cost, side by side in one run: three stacks
of the three services as processes on the default model (plaintext and
open; TLS with the API's tokens and mutual TLS to the worker and gateway;
the same with OpenTelemetry exporting to a local OTLP receiver), with
requests alternating between them so drift hits each alike.

    python -m bench.security [--quick]     (make bench-security)

Rows: a unary call through the scheduler (ListTools), a unary call straight
to the worker (GetModelInfo; mutual TLS), a new connection and its first
call (the TLS handshake), and a whole forced run with a python tool call
(two rounds, both downstream services). Writes bench/results/security.{md,json}.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import tempfile
import time
from concurrent import futures
from pathlib import Path

import grpc

from bench import common
from conveyor_common import certs
from conveyor_common.security import TlsFiles

OUT = Path("bench/results/security")
PROGRAM = "```python\nprint(6 * 7)\n```\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    """One stack's ports, flags and client credentials."""

    def __init__(self, name: str, secrets: Path | None, otlp: str = ""):
        self.name = name
        self.secrets = secrets
        self.ports = {k: _free_port() for k in ("scheduler", "worker", "gateway")}
        self.health = {k: _free_port() for k in self.ports}
        self.otlp = otlp
        self.token = (secrets / "api-tokens").read_text().strip() if secrets else ""

    def _tls(self, service: str, peer_check: bool) -> tuple[str, ...]:
        if self.secrets is None:
            return ()
        s = self.secrets
        out = ("--tls-cert", str(s / f"{service}.crt"), "--tls-key", str(s / f"{service}.key"))
        if peer_check:
            out += ("--tls-ca", str(s / "ca.crt"), "--tls-allowed-names", "scheduler")
        return out

    def services(self):
        from conveyor_common.stack import WORKER_ARGS, Service

        common_args = ("--metrics-port", "0")
        if self.otlp:
            common_args += ("--otlp-endpoint", self.otlp)
        scheduler = (
            "--worker-target",
            f"dns:///localhost:{self.ports['worker']}",
            "--gateway-target",
            f"dns:///localhost:{self.ports['gateway']}",
            *self._tls("scheduler", peer_check=False),
        )
        if self.secrets is not None:
            scheduler += (
                "--auth-token-file",
                str(self.secrets / "api-tokens"),
                "--downstream-tls-ca",
                str(self.secrets / "ca.crt"),
            )
        return (
            Service(
                f"{self.name}-llm_worker",
                "llm_worker",
                self.ports["worker"],
                (
                    *WORKER_ARGS,
                    *common_args,
                    "--health-port",
                    str(self.health["worker"]),
                    *self._tls("llm-worker", peer_check=True),
                ),
                health_port=self.health["worker"],
            ),
            Service(
                f"{self.name}-tool_gateway",
                "tool_gateway",
                self.ports["gateway"],
                (
                    *common_args,
                    "--health-port",
                    str(self.health["gateway"]),
                    *self._tls("tool-gateway", peer_check=True),
                ),
                health_port=self.health["gateway"],
            ),
            Service(
                f"{self.name}-scheduler",
                "scheduler",
                self.ports["scheduler"],
                (*scheduler, *common_args, "--health-port", str(self.health["scheduler"])),
                health_port=self.health["scheduler"],
            ),
        )

    def channel(self, service: str, identity: str | None = None) -> grpc.aio.Channel:
        target = f"localhost:{self.ports[service]}"
        if self.secrets is None:
            return grpc.aio.insecure_channel(target)
        s = self.secrets
        tls = TlsFiles(
            str(s / f"{identity}.crt") if identity else None,
            str(s / f"{identity}.key") if identity else None,
            str(s / "ca.crt"),
        )
        return grpc.aio.secure_channel(target, tls.channel_credentials())

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()


class _Receiver:
    """An OTLP/gRPC trace receiver, so the tracing stack exports for real."""

    def __init__(self):
        from opentelemetry.proto.collector.trace.v1 import (
            trace_service_pb2,
            trace_service_pb2_grpc,
        )

        receiver = self
        self.spans = 0

        class Servicer(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):
                receiver.spans += sum(
                    len(scope.spans) for r in request.resource_spans for scope in r.scope_spans
                )
                return trace_service_pb2.ExportTraceServiceResponse()

        self.server = grpc.server(futures.ThreadPoolExecutor(2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Servicer(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()


async def _timed(call) -> float:
    start = time.perf_counter()
    await call()
    return time.perf_counter() - start


async def measure(stacks: list[Stack], quick: bool, say) -> dict:
    from conveyor.v1 import (
        common_pb2,
        conveyor_pb2,
        conveyor_pb2_grpc,
        llm_worker_pb2,
        llm_worker_pb2_grpc,
    )

    n_unary, n_connect, n_runs = (60, 10, 3) if quick else (400, 40, 12)
    samples: dict[str, dict[str, list[float]]] = {s.name: {} for s in stacks}
    channels = {s.name: (s.channel("scheduler"), s.channel("worker", "scheduler")) for s in stacks}

    def add(stack: Stack, row: str, value: float) -> None:
        samples[stack.name].setdefault(row, []).append(value)

    run_request = conveyor_pb2.RunRequest(
        messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="Compute.")],
        tool_names=["python"],
        forced_completions=[PROGRAM, "It printed 42."],
        max_rounds=2,
    )
    for warm in (True, False):
        for _ in range(3 if warm else n_unary):
            for stack in stacks:
                public, worker = channels[stack.name]
                stub = conveyor_pb2_grpc.ConveyorServiceStub(public)
                t = await _timed(
                    lambda stub=stub, stack=stack: stub.ListTools(
                        conveyor_pb2.ListToolsRequest(), timeout=10, metadata=stack.metadata()
                    )
                )
                w = llm_worker_pb2_grpc.LlmWorkerServiceStub(worker)
                u = await _timed(
                    lambda w=w: w.GetModelInfo(llm_worker_pb2.GetModelInfoRequest(), timeout=10)
                )
                if not warm:
                    add(stack, "ListTools via the scheduler", t)
                    add(stack, "GetModelInfo on the worker", u)
        say(f"unary calls {'warmed' if warm else 'measured'}")
    for _ in range(n_connect):
        for stack in stacks:

            async def connect(stack=stack):
                async with stack.channel("scheduler") as channel:
                    await conveyor_pb2_grpc.ConveyorServiceStub(channel).ListTools(
                        conveyor_pb2.ListToolsRequest(), timeout=10, metadata=stack.metadata()
                    )

            add(stack, "new connection + first call", await _timed(connect))
    say("connections measured")
    for i in range(n_runs + 1):
        for stack in stacks:
            stub = conveyor_pb2_grpc.ConveyorServiceStub(channels[stack.name][0])

            async def run(stub=stub, stack=stack):
                events = [
                    e async for e in stub.Run(run_request, timeout=120, metadata=stack.metadata())
                ]
                finished = events[-1].run_finished
                assert finished.finish_reason == common_pb2.FINISH_REASON_FORCED_END, finished
                assert any(e.unit_result.result.stdout == "42\n" for e in events)

            elapsed = await _timed(run)
            if i:  # the first run of each stack warms it
                add(stack, "forced run with a python call", elapsed)
        say(f"run {i}/{n_runs}")
    for public, worker in channels.values():
        await public.close()
        await worker.close()
    rows = {}
    for row in samples[stacks[0].name]:
        rows[row] = {s.name: common.latency_summary(samples[s.name][row]) for s in stacks}
    return rows


def report(results: dict) -> str:
    names = results["stacks"]
    base = names[0]
    lines = [
        "# Security and tracing overhead",
        "",
        f"{results['machine']['cpu_model']} ({results['machine']['cpu_count']} CPUs), "
        f"{results['date']}. Three stacks of three processes each on the default model, "
        "requests alternating between them. Medians (p90), ms; ratio to plaintext.",
        "",
        "| | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for row, by_stack in results["rows"].items():
        cells = []
        for name in names:
            m = by_stack[name]
            ratio = m["median_ms"] / by_stack[base]["median_ms"]
            cells.append(f"{m['median_ms']:.2f} ({m['p90_ms']:.2f}) ×{ratio:.2f}")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines += ["", f"Spans received by the OTLP receiver: {results['spans_exported']}.", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    from conveyor_common import stack as local_stack

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples (a smoke run)")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    say = common.progress("security")
    receiver = _Receiver()
    with tempfile.TemporaryDirectory() as tmp:
        secrets = Path(tmp) / "secrets"
        certs.write_bundle(secrets)
        stacks = [
            Stack("plaintext", None),
            Stack("tls+tokens", secrets),
            Stack("tls+tokens+tracing", secrets, otlp=f"http://127.0.0.1:{receiver.port}"),
        ]
        state = Path(tmp) / "state"
        services = tuple(s for st in stacks for s in st.services())
        pids = local_stack.start(services, state)
        try:
            local_stack.wait_healthy(pids, services=services, state_dir=state)
            say("stacks healthy")
            rows = asyncio.run(measure(stacks, args.quick, say))
        finally:
            local_stack.stop(pids, state_dir=state)  # tracing flushes on SIGTERM
    receiver.server.stop(0)
    results = {
        "machine": common.machine(),
        "date": common.now(),
        "quick": args.quick,
        "stacks": [s.name for s in stacks],
        "rows": rows,
        "spans_exported": receiver.spans,
    }
    common.publish(results, args.out, report(results))


if __name__ == "__main__":
    main()
