"""The paper's Figure 6, side by side: each workload's requests run in
PARTIAL and SEQUENTIAL mode, alternating, through the three real services
(separate processes, over gRPC), with forced decoding on the default model.

    python -m bench.e2e [--quick] [--requests 10] [--workloads code,search,...]
                        [--out bench/results/e2e] [--report earlier.json]

Writes <out>.md, <out>.json and <out>.png. See WORKLOADS.md for the method.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench import common
from bench.e2e import overheads, report, workloads
from bench.e2e.search_service import SearchService
from bench.e2e.timeline import RunTimeline

PORTS = {"llm_worker": 50152, "tool_gateway": 50153, "scheduler": 50151}
STATE_DIR = Path(".cache/bench-stack")


# The venv `make install-vllm` builds, for the worker with --engine vllm.
VLLM_PYTHON = Path(".venv-vllm/bin/python")


def worker_service(engine: str):
    """The worker on `engine`: hf in this venv, vllm in .venv-vllm."""
    from conveyor_common.stack import WORKER_ARGS, Service

    if engine == "vllm":
        if not VLLM_PYTHON.is_file():
            sys.exit(f"--engine vllm needs {VLLM_PYTHON}: make install-vllm")
        args = ("--metrics-port", "0", "--engine", "vllm")
        return Service("llm_worker", "llm_worker", PORTS["llm_worker"], args, str(VLLM_PYTHON))
    return Service(
        "llm_worker", "llm_worker", PORTS["llm_worker"], ("--metrics-port", "0", *WORKER_ARGS)
    )


def stack_services(search_url: str, engine: str = "hf"):
    from conveyor_common.stack import Service

    return (
        worker_service(engine),
        Service(
            "tool_gateway",
            "tool_gateway",
            PORTS["tool_gateway"],
            ("--metrics-port", "0", "--search-url", search_url, "--unit-timeout", "60"),
        ),
        Service(
            "scheduler",
            "scheduler",
            PORTS["scheduler"],
            (
                "--metrics-port",
                "0",
                "--worker-target",
                f"dns:///localhost:{PORTS['llm_worker']}",
                "--gateway-target",
                f"dns:///localhost:{PORTS['tool_gateway']}",
            ),
        ),
    )


async def run_one(stub, request: workloads.BenchRequest, partial: bool) -> RunTimeline:
    from conveyor.v1 import common_pb2, conveyor_pb2

    mode = (
        conveyor_pb2.EXECUTION_MODE_PARTIAL if partial else conveyor_pb2.EXECUTION_MODE_SEQUENTIAL
    )
    pb = conveyor_pb2.RunRequest(
        messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=request.prompt)],
        tool_names=list(request.tools),
        mode=mode,
        forced_completions=list(request.completions),
        max_rounds=len(request.completions),
        envelopes=[conveyor_pb2.ENVELOPE_PLAN] if request.plan else [],
    )
    timeline = RunTimeline(time.perf_counter())
    async for response in stub.Run(pb, timeout=900):
        timeline.add(response)
    timeline.finished = time.perf_counter()
    return timeline


def _finish_name(timeline: RunTimeline) -> str:
    from conveyor.v1 import common_pb2

    return common_pb2.FinishReason.Name(timeline.final().finish_reason).removeprefix(
        "FINISH_REASON_"
    )


async def measure(
    target: str, requests: dict[str, list[workloads.BenchRequest]], progress
) -> list[dict]:
    """Both modes of every request, alternating which goes first."""
    import grpc
    from conveyor.v1 import conveyor_pb2_grpc

    rows = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = conveyor_pb2_grpc.ConveyorServiceStub(channel)
        # A warm-up run per tool, so no workload pays first-use costs.
        for reqs in requests.values():
            await run_one(stub, reqs[0], partial=True)
            progress.update(0)
        for workload, reqs in requests.items():
            for i, request in enumerate(reqs):
                order = (True, False) if i % 2 == 0 else (False, True)
                runs = {}
                for partial in order:
                    runs[partial] = await run_one(stub, request, partial)
                    progress.update(1)
                p, s = runs[True], runs[False]
                rows.append(
                    {
                        "workload": workload,
                        "request": request.name,
                        "partial_s": p.latency,
                        "sequential_s": s.latency,
                        "ideal_s": min(p.ideal_latency(), p.latency),
                        "finish": {"partial": _finish_name(p), "sequential": _finish_name(s)},
                        "expect_abort": request.expect_abort,
                        "same_results": p.unit_results() == s.unit_results(),
                        "decode_s": {
                            "partial": p.final().timing.decode_seconds,
                            "sequential": s.final().timing.decode_seconds,
                        },
                        "tool_s": p.final().timing.tool_seconds,
                        "hidden_tool_s": p.final().timing.hidden_tool_seconds,
                        "tokens": {
                            "partial": p.final().timing.completion_tokens,
                            "sequential": s.final().timing.completion_tokens,
                        },
                        "parse_lag_s": p.final().timing.parse_lag_seconds,
                        "dispatch_to_start_s": p.dispatch_to_start(),
                    }
                )
                progress.set_postfix_str(
                    f"{workload} {request.name}: partial {p.latency:.1f}s, "
                    f"sequential {s.latency:.1f}s"
                )
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for workload in workloads.WORKLOADS:
        mine = [r for r in rows if r["workload"] == workload]
        if not mine:
            continue
        p = [r["partial_s"] for r in mine]
        s = [r["sequential_s"] for r in mine]
        ideal = [r["ideal_s"] for r in mine]
        possible = statistics.mean(s) - statistics.mean(ideal)
        got = statistics.mean(s) - statistics.mean(p)
        aborted = [r for r in mine if r["expect_abort"]]
        # Standard error of the mean paired difference: how far apart the two
        # modes' means land by chance on this machine.
        diffs = [a - b for a, b in zip(s, p, strict=True)]
        noise = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else None
        out.append(
            {
                "workload": workload,
                "requests": len(mine),
                "partial_mean_s": statistics.mean(p),
                "partial_p90_s": _p90(p),
                "sequential_mean_s": statistics.mean(s),
                "sequential_p90_s": _p90(s),
                "ideal_mean_s": statistics.mean(ideal),
                "reduction_pct": 100 * got / statistics.mean(s),
                "ideal_reduction_pct": 100 * possible / statistics.mean(s),
                "share_of_ideal_pct": 100 * got / possible if possible > 1e-3 else None,
                "possible_saving_s": possible,
                "paired_noise_s": noise,
                "same_results": all(r["same_results"] for r in mine),
                "aborted": len(aborted),
                "abort_tokens_saved_pct": (
                    100
                    * (
                        1
                        - sum(r["tokens"]["partial"] for r in aborted)
                        / max(1, sum(r["tokens"]["sequential"] for r in aborted))
                    )
                    if aborted
                    else None
                ),
            }
        )
    return out


def _p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, help="requests per workload (default 10; quick 1)")
    ap.add_argument("--quick", action="store_true", help="one request per workload (CI)")
    ap.add_argument(
        "--workloads", help=f"comma-separated subset of {','.join(workloads.WORKLOADS)}"
    )
    ap.add_argument("--out", default="bench/results/e2e", help="writes <out>.md/.json/.png")
    ap.add_argument("--no-overheads", action="store_true", help="skip the overhead measurements")
    ap.add_argument(
        "--engine",
        default="hf",
        choices=["hf", "vllm"],
        help="the worker's engine (vllm: needs make install-vllm; writes <out>-vllm.*)",
    )
    ap.add_argument(
        "--report", metavar="JSON", help="rebuild the summary and report of an earlier run's JSON"
    )
    args = ap.parse_args(argv)
    n = args.requests or (1 if args.quick else 10)
    names = args.workloads.split(",") if args.workloads else list(workloads.WORKLOADS)
    unknown = set(names) - set(workloads.WORKLOADS)
    if unknown:
        ap.error(f"unknown workloads {sorted(unknown)}")
    if args.report:
        results = json.loads(Path(args.report).read_text(encoding="utf-8"))
        results["workloads"] = summarize(results["runs"])
    else:
        results = run(names, n, args.quick, not args.no_overheads, args.engine)
    if args.engine != "hf" and not args.report:
        args.out = f"{args.out}-{args.engine}"
    common.publish(results, args.out, report.markdown(results))
    png_path = report.chart(results, Path(args.out).with_suffix(".png"))
    print(f"wrote {png_path}", file=sys.stderr)
    return 0 if all(r["same_results"] for r in results["workloads"]) else 1


def run(names: list[str], n: int, quick: bool, with_overheads: bool, engine: str = "hf") -> dict:
    from tqdm import tqdm

    from conveyor_common import stack
    from tool_gateway.corpus import ensure_index

    say = common.progress("bench.e2e")
    requests = {name: workloads.build(name, n) for name in names}
    total = sum(len(r) for r in requests.values()) * 2
    with SearchService(str(ensure_index())) as search:
        services = stack_services(search.url, engine)
        say("starting the three services")
        pids = stack.start(services, STATE_DIR)
        try:
            stack.wait_healthy(pids, services=services, state_dir=STATE_DIR)
            target = f"127.0.0.1:{PORTS['scheduler']}"
            with tqdm(total=total, desc="runs", unit="run", file=sys.stderr) as progress:
                rows = asyncio.run(measure(target, requests, progress))
            extra = (
                overheads.measure(
                    target,
                    f"127.0.0.1:{PORTS['llm_worker']}",
                    f"127.0.0.1:{PORTS['tool_gateway']}",
                    rows,
                    quick=quick,
                    say=say,
                )
                if with_overheads
                else {}
            )
        finally:
            stack.stop(pids, state_dir=STATE_DIR)
    return {
        "benchmark": "e2e",
        "date": common.now(),
        "machine": common.machine(),
        "config": {
            "requests_per_workload": n,
            "quick": quick,
            "model": "SmolLM2-135M-Instruct (forced decoding)",
            "engine": engine,
            "search_latency": "lognormal, median 0.8 s, sigma 0.35, cap 3 s",
        },
        "workloads": summarize(rows),
        "runs": rows,
        "overheads": extra,
    }


if __name__ == "__main__":
    sys.exit(main())
