"""What the machinery costs, measured in the same run as the workloads:
parser microseconds per delta, the scheduler hop (a stream through the
scheduler against the same stream straight from the worker), the time from a
unit's dispatch to its tool starting, and the worker's decode throughput."""

from __future__ import annotations

import asyncio
import statistics
import time

HOP_TEXT = (
    "Partial execution starts each tool command as soon as the model has written it, "
    "while decoding goes on; this text has no tool call, so the scheduler only relays it. "
) * 2


def measure(scheduler: str, worker: str, gateway: str, rows: list[dict], quick: bool, say) -> dict:
    hop = asyncio.run(_hop(scheduler, worker, gateway, quick))
    out = {"parsers": _parsers(quick, say), "hop": hop}
    say(
        f"scheduler hop: TTFT +{out['hop']['ttft_added_ms']:.1f} ms, "
        f"last delta +{out['hop']['last_delta_added_ms']:.1f} ms"
    )
    lags = [lag for r in rows for lag in r["dispatch_to_start_s"]]
    out["dispatch_to_start_ms"] = (
        {
            "median": 1000 * statistics.median(lags),
            "p90": 1000 * sorted(lags)[int(0.9 * (len(lags) - 1))],
            "units": len(lags),
        }
        if lags
        else None
    )
    parse = [r["parse_lag_s"] for r in rows if r["parse_lag_s"] > 0]
    out["parse_lag_ms"] = 1000 * statistics.mean(parse) if parse else None
    out["worker"] = None if quick else _worker(say)
    return out


def _parsers(quick: bool, say) -> list[dict]:
    from bench.parsers.__main__ import run as run_parsers

    keys = ["PYTHON_STATEMENTS", "JSON_FIELDS", "JSON_FIELDS:code", "PLAN_STEPS", "SQL_STATEMENTS"]
    results = run_parsers([4], quick=True, keys=keys)
    say("parsers measured")
    return [
        {
            "mode": r["key"],
            "median_us": r["ours"]["median_us"],
            "partial_json_parser_us": r["baselines"]
            .get("partial_json_parser", {})
            .get("median_us"),
        }
        for r in results["rows"]
    ]


async def _hop(scheduler: str, worker: str, gateway: str, quick: bool) -> dict:
    """The same forced text with the same tool in the prompt, straight from
    the worker and through the scheduler, alternating; the difference is
    what the hop adds."""
    import grpc
    from conveyor.v1 import (
        common_pb2,
        conveyor_pb2,
        conveyor_pb2_grpc,
        llm_worker_pb2,
        llm_worker_pb2_grpc,
        tool_gateway_pb2,
        tool_gateway_pb2_grpc,
    )

    async with grpc.aio.insecure_channel(gateway) as g_channel:
        listed = await tool_gateway_pb2_grpc.ToolGatewayServiceStub(g_channel).ListTools(
            tool_gateway_pb2.ToolGatewayServiceListToolsRequest(), timeout=30
        )
    tool = next(t for t in listed.tools if t.name == "calculator")
    # What the scheduler sends the worker for a tool: name, description, schema.
    spec = common_pb2.ToolSpec(
        name=tool.name,
        description=tool.description,
        parameters_json_schema=tool.parameters_json_schema,
    )

    message = common_pb2.ChatMessage(
        role=common_pb2.ROLE_USER, content="Explain partial execution."
    )
    direct, relayed = [], []
    async with (
        grpc.aio.insecure_channel(scheduler) as s_channel,
        grpc.aio.insecure_channel(worker) as w_channel,
    ):
        run_stub = conveyor_pb2_grpc.ConveyorServiceStub(s_channel)
        gen_stub = llm_worker_pb2_grpc.LlmWorkerServiceStub(w_channel)
        for i in range(2 if quick else 6):
            for via_scheduler in (i % 2 == 0, i % 2 == 1):
                start = time.perf_counter()
                stamps = []
                if via_scheduler:
                    request = conveyor_pb2.RunRequest(
                        messages=[message],
                        tool_names=[tool.name],
                        forced_completions=[HOP_TEXT],
                        max_rounds=1,
                    )
                    async for r in run_stub.Run(request, timeout=300):
                        if r.WhichOneof("event") == "token_delta":
                            stamps.append(time.perf_counter() - start)
                    relayed.append(stamps)
                else:
                    request = llm_worker_pb2.GenerateRequest(
                        messages=[message],
                        tools=[spec],
                        forced_decoding=common_pb2.ForcedDecoding(completion=HOP_TEXT),
                    )
                    async for r in gen_stub.Generate(request, timeout=300):
                        if r.WhichOneof("event") == "delta":
                            stamps.append(time.perf_counter() - start)
                    direct.append(stamps)
    ttft = statistics.mean(s[0] for s in relayed) - statistics.mean(s[0] for s in direct)
    last = statistics.mean(s[-1] for s in relayed) - statistics.mean(s[-1] for s in direct)
    return {
        "pairs": len(direct),
        "deltas": len(direct[0]),
        "ttft_direct_ms": 1000 * statistics.mean(s[0] for s in direct),
        "ttft_added_ms": 1000 * ttft,
        "last_delta_added_ms": 1000 * last,
    }


def _worker(say) -> dict:
    from bench.worker.__main__ import run as run_worker

    results = asyncio.run(run_worker([1, 8], 48, 1, say=say))
    return {
        "generate_tokens_per_s": results["generate"]["tokens_per_s"],
        "rows": [
            {k: r[k] for k in ("streams", "aggregate_tokens_per_s", "ttft_mean_s")}
            for r in results["rows"]
        ],
    }
