"""Worker decode speed: one stream and 1/4/8/16 concurrent streams through the
real gRPC worker (`python -m llm_worker`, a process of its own), against plain
`model.generate()` one request after another on the same model and dtype in
this process, in one run.

    python -m bench.worker [--streams 1,4,8,16] [--tokens 128] [--quick] [--model ID]
                           [--device auto|cpu|cuda] [--dtype auto|float32|bfloat16]
                           [--out bench/results/worker]

Both sides do the same work token for token: the baseline's greedy output
for each prompt is what the worker is then asked to emit by forced decoding
(each forced token is a real decode step in the shared batch). Prompts are
real text: summaries asked of standard-library docstrings.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from bench import common

FULL_STREAMS = (1, 4, 8, 16)
QUICK_STREAMS = (1, 4)
GOAL_BATCH_SPEEDUP = 3.0  # aggregate tok/s at 8 streams over one stream


def prompts(n: int) -> list[str]:
    """`n` different real prompts: summarize a stdlib module's docstring."""
    names = (
        "json collections itertools re typing statistics heapq argparse logging sqlite3 csv "
        "random string shutil pickle copy inspect ast tokenize unittest doctest pprint operator "
        "gzip difflib calendar codecs configparser fnmatch hashlib hmac ipaddress locale "
        "mimetypes sched secrets selectors socket struct subprocess tempfile timeit trace uuid"
    ).split()
    docs = [doc for doc in common.stdlib_docstrings(names) if len(doc) > 80]
    if len(docs) < n:
        raise ValueError(f"only {len(docs)} prompts available, {n} asked for")
    return [f"Summarize this documentation in a few sentences:\n\n{doc[:1200]}" for doc in docs[:n]]


@dataclass
class StreamResult:
    exact: bool  # the stream's text is exactly the forced completion
    tokens: int
    ttft_s: float
    decode_s: float  # first to last token
    total_s: float


@dataclass
class GenerateResult:
    completion: str  # the greedy output, for forced decoding
    tokens: int
    ttft_s: float
    total_s: float
    decode_tokens_per_s: float


def generate_once(model, tokenizer, text: str, max_new: int) -> GenerateResult:
    """Plain `generate()`, greedy, on one prompt, exactly `max_new` tokens."""
    import torch

    from conveyor_common.types import Message
    from llm_worker.prompt import prompt_ids

    device = model.get_input_embeddings().weight.device
    ids = torch.tensor([prompt_ids(tokenizer, [Message("user", text)], [])], device=device)
    kwargs = dict(
        attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=tokenizer.eos_token_id
    )
    with torch.inference_mode():
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=1, **kwargs)
        ttft = time.perf_counter() - start
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=max_new, min_new_tokens=max_new, **kwargs)
        elapsed = time.perf_counter() - start
    new = out[0, ids.shape[1] :].tolist()
    return GenerateResult(
        completion=tokenizer.decode(new, skip_special_tokens=True),
        tokens=len(new),
        ttft_s=ttft,
        total_s=elapsed,
        decode_tokens_per_s=(len(new) - 1) / max(elapsed - ttft, 1e-9),
    )


def summarize_generate(results: list[GenerateResult]) -> dict:
    return {
        "requests": len(results),
        "tokens": sum(r.tokens for r in results),
        "tokens_per_s": sum(r.tokens for r in results) / sum(r.total_s for r in results),
        "decode_tokens_per_s": statistics.mean(r.decode_tokens_per_s for r in results),
        "ttft_mean_s": statistics.mean(r.ttft_s for r in results),
    }


async def one_stream(stub, text: str, completion: str) -> StreamResult:
    from conveyor.v1 import common_pb2, llm_worker_pb2

    request = llm_worker_pb2.GenerateRequest(
        messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=text)],
        forced_decoding=common_pb2.ForcedDecoding(completion=completion),
    )
    start = time.perf_counter()
    first = last = 0.0
    tokens, text = 0, ""
    async for response in stub.Generate(request, timeout=600):
        kind = response.WhichOneof("event")
        if kind == "delta":
            text += response.delta.text
            last = time.perf_counter()
            first = first or last
        elif kind == "complete":
            tokens = response.complete.completion_tokens
        else:
            raise RuntimeError(response.error.message)
    exact = text == completion
    return StreamResult(exact, tokens, first - start, last - first, time.perf_counter() - start)


async def concurrent(target: str, texts: list[str], completions: list[str]) -> dict:
    """Every text as its own stream, all at once: one row of the table."""
    return summarize_streams([await _streams(target, texts, completions)])


async def _streams(target: str, texts: list[str], completions: list[str]):
    import grpc
    from conveyor.v1 import llm_worker_pb2_grpc

    async with grpc.aio.insecure_channel(target) as channel:
        stub = llm_worker_pb2_grpc.LlmWorkerServiceStub(channel)
        start = time.perf_counter()
        results = await asyncio.gather(
            *(one_stream(stub, t, c) for t, c in zip(texts, completions, strict=True))
        )
        return results, time.perf_counter() - start


def summarize_streams(runs: list[tuple[list[StreamResult], float]]) -> dict:
    """One row from one or more runs at the same concurrency (their walls add up)."""
    results = [r for rs, _ in runs for r in rs]
    tokens = sum(r.tokens for r in results)
    wall = sum(w for _, w in runs)
    ttfts = sorted(r.ttft_s for r in results)
    return {
        "streams": len(runs[0][0]),
        "runs": len(runs),
        "exact_streams": sum(r.exact for r in results) // len(runs),
        "tokens": tokens // len(runs),
        "wall_s": wall,
        "aggregate_tokens_per_s": tokens / wall,
        "per_stream_tokens_per_s": statistics.mean(
            (r.tokens - 1) / r.decode_s for r in results if r.decode_s > 0
        ),
        "ttft_mean_s": statistics.mean(ttfts),
        "ttft_p90_s": ttfts[min(len(ttfts) - 1, int(0.9 * len(ttfts)))],
    }


async def run(
    streams: Sequence[int],
    tokens: int,
    baseline_requests: int,
    model: str = "",
    device: str = "auto",
    quick: bool = False,
    say=None,
    threads: int = 0,
    dtype: str = "auto",
) -> dict:
    from pathlib import Path

    from bench.worker.servers import Subprocess, free_port, wait_serving
    from llm_worker.config import WorkerConfig
    from llm_worker.loader import load

    say = say or common.progress("bench.worker")
    # The baseline's model, in this process; the worker is a process of its
    # own, as users run it (one process with both would hold two OpenMP pools).
    config = WorkerConfig(model=model, device=device, dtype=dtype, threads=threads)
    base_model, tokenizer, label = load(config)
    device_name = str(base_model.get_input_embeddings().weight.device)
    dtype_name = str(next(base_model.parameters()).dtype).removeprefix("torch.")
    port = free_port()
    # generate() runs on the same count for prefill and decode: so does the worker here.
    argv = [
        sys.executable, "-m", "llm_worker", "--port", str(port),
        "--metrics-port", str(free_port()), "--device", device_name.split(":")[0],
        "--dtype", dtype_name, "--max-batch", str(max(streams)),
        "--threads", str(threads), "--prefill-threads", str(threads),
        "--prefix-cache-tokens", "0",  # every request pays its full prefill, as generate() does
    ]  # fmt: skip
    if model:
        argv += ["--model", model]
    texts = prompts(max(max(streams), baseline_requests))
    target = f"127.0.0.1:{port}"
    rows, generated, single = [], [], []
    with Subprocess(argv, Path(".cache/bench-worker/worker.log"), "the worker") as proc:
        await wait_serving(target, proc)
        say(f"model {label} on {device_name}; generate() and one stream x{baseline_requests}")
        # The baseline and the single stream alternate prompt by prompt, so a
        # drift in the machine's speed hits both sides of that ratio alike.
        for i, text in enumerate(texts[:baseline_requests]):
            generated.append(generate_once(base_model, tokenizer, text, tokens))
            single.append(await _streams(target, [text], [generated[-1].completion]))
            say(
                f"prompt {i + 1}/{baseline_requests}: generate() "
                f"{generated[-1].tokens / generated[-1].total_s:.1f} tok/s, one stream "
                f"{single[-1][0][0].tokens / single[-1][1]:.1f} tok/s"
            )
        base = summarize_generate(generated)
        # The prompts past the baseline's get the baseline's completions in turn.
        completions = [generated[i % len(generated)].completion for i in range(len(texts))]
        for n in streams:
            row = (
                summarize_streams(single)
                if n == 1
                else await concurrent(target, texts[:n], completions[:n])
            )
            rows.append(row)
            say(
                f"{n} stream(s): {row['aggregate_tokens_per_s']:.1f} tok/s aggregate, "
                f"{row['per_stream_tokens_per_s']:.1f} per stream, "
                f"TTFT {row['ttft_mean_s'] * 1000:.0f} ms"
            )
    one = next((r for r in rows if r["streams"] == 1), None)
    for row in rows:
        row["vs_one_stream"] = (
            row["aggregate_tokens_per_s"] / one["aggregate_tokens_per_s"] if one else None
        )
        row["vs_generate"] = row["aggregate_tokens_per_s"] / base["tokens_per_s"]
    at8 = next((r for r in rows if r["streams"] == 8), None)
    import torch

    return {
        "benchmark": "worker",
        "date": common.now(),
        "machine": common.machine(),
        "config": {
            "model": label,
            "device": device_name,
            "dtype": dtype_name,
            "torch_threads": torch.get_num_threads(),
            "tokens_per_stream": tokens,
            "streams": list(streams),
            "quick": quick,
        },
        "generate": base,
        "rows": rows,
        "goals": {
            "batch_speedup_at_8": {
                "value": at8["vs_one_stream"] if at8 and one else None,
                "goal": GOAL_BATCH_SPEEDUP,
                "met": bool(at8 and one and at8["vs_one_stream"] >= GOAL_BATCH_SPEEDUP),
            },
            "single_stream_vs_generate": {
                "value": one["vs_generate"] if one else None,
                "goal": 1.0,
                "met": bool(one and one["vs_generate"] >= 1.0),
            },
        },
    }


def markdown(results: dict) -> str:
    m, cfg, base = results["machine"], results["config"], results["generate"]
    cpu = common.cpu_name(m)
    out = [
        "# Conveyor worker decode speed",
        "",
        f"Machine: {cpu}, {m['cpu_count']} CPUs; device {cfg['device']} ({cfg['dtype']}, "
        f"{cfg['torch_threads']} torch threads). Model: {cfg['model']}. "
        f"Date: {results['date']}.",
        "",
        f"Each stream decodes {cfg['tokens_per_stream']} tokens through the gRPC worker "
        "(forced decoding of generate()'s own greedy output, so both do the same steps). "
        "Baseline: `model.generate()` one request after another; the one-stream row pools "
        f"{base['requests']} single streams, each run right after generate() on its prompt.",
        "",
        "| streams | aggregate tok/s | per-stream tok/s | TTFT mean | TTFT p90 "
        "| × one stream | × generate() | exact text |",
        "|---|---|---|---|---|---|---|---|",
        f"| generate(), sequential | {base['tokens_per_s']:.1f} | "
        f"{base['decode_tokens_per_s']:.1f} | {base['ttft_mean_s'] * 1000:.0f} ms | | | 1.00× | |",
    ]
    for r in results["rows"]:
        vs_one = f"{r['vs_one_stream']:.2f}×" if r["vs_one_stream"] is not None else ""
        out.append(
            f"| {r['streams']} | {r['aggregate_tokens_per_s']:.1f} | "
            f"{r['per_stream_tokens_per_s']:.1f} | {r['ttft_mean_s'] * 1000:.0f} ms | "
            f"{r['ttft_p90_s'] * 1000:.0f} ms | {vs_one} | {r['vs_generate']:.2f}× | "
            f"{r['exact_streams']}/{r['streams']} |"
        )
    g = results["goals"]
    out += ["", "## Goals", ""]
    speedup, single = g["batch_speedup_at_8"], g["single_stream_vs_generate"]
    if speedup["value"] is not None:
        out.append(
            f"- aggregate at 8 streams ≥ {speedup['goal']:g}× one stream: "
            f"{speedup['value']:.2f}× — {'met' if speedup['met'] else 'MISSED'}"
        )
    if single["value"] is not None:
        out.append(
            f"- one stream no slower than generate(): {single['value']:.2f}× — "
            f"{'met' if single['met'] else 'MISSED'}"
        )
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.worker", description=__doc__.split("\n")[0])
    ap.add_argument("--streams", help="concurrency levels, comma-separated (default 1,4,8,16)")
    ap.add_argument("--tokens", type=int, help="tokens per stream (default 128; quick 16)")
    ap.add_argument("--baseline-requests", type=int, help="generate() calls (default 4; quick 1)")
    ap.add_argument("--quick", action="store_true", help="1 and 4 streams, 16 tokens (CI)")
    ap.add_argument("--model", default="", help="model id or path (default: the embedded one)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    ap.add_argument(
        "--threads", type=int, default=0, help="worker CPU threads (default: torch's, per core)"
    )
    ap.add_argument("--out", default="bench/results/worker", help="writes <out>.md and <out>.json")
    args = ap.parse_args(argv)
    streams = (
        [int(s) for s in args.streams.split(",")]
        if args.streams
        else list(QUICK_STREAMS if args.quick else FULL_STREAMS)
    )
    tokens = args.tokens or (16 if args.quick else 128)
    baseline_requests = args.baseline_requests or (1 if args.quick else 4)
    results = asyncio.run(
        run(
            streams,
            tokens,
            baseline_requests,
            args.model,
            args.device,
            args.quick,
            threads=args.threads,
            dtype=args.dtype,
        )
    )
    common.publish(results, args.out, markdown(results))
    return 0


if __name__ == "__main__":
    from bench.worker.servers import stop_workers_on_sigterm

    stop_workers_on_sigterm()
    sys.exit(main())
