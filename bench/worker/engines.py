"""The worker on each engine, side by side in one run, on the same prompts,
forced completions and stream counts:

- hf: the worker's own transformers engine (in this process);
- vllm: `--engine vllm`, vLLM's AsyncLLM inside the worker (.venv-vllm);
- openai→vllm: `--engine openai` in front of vLLM's OpenAI server;
- vLLM direct: that same server called without the worker (streaming
  /v1/completions with the same token ids), the reference the worker's
  overhead is measured against (goal: at most 3 % of throughput and TTFT).

    python -m bench.worker.engines [--streams 1,4,8,16] [--tokens 128] [--quick]
                                   [--out bench/results/engines]

The completions are the hf worker's greedy output on each prompt, forced on
every engine (one real decode step per token), so all rows do the same work
and every row checks its text is exact. The phases run one after another,
never two engines at once. Needs `make install-vllm`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench import common
from bench.worker.__main__ import StreamResult, _streams, prompts, summarize_streams
from bench.worker.servers import ROOT, Subprocess, free_port, wait_healthy, wait_serving

VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
FULL_STREAMS = (1, 4, 8, 16)
QUICK_STREAMS = (1, 4)
GOAL_OVERHEAD = 0.03  # the worker adds at most 3 % to vLLM's own numbers


async def _direct_stream(client, model: str, prompt: list[int], forced: list[int]):
    """One stream straight to vLLM's server, timed as the worker's are."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": len(forced),
        "stream": True,
        "return_token_ids": True,
        "temperature": 0.0,
        "ignore_eos": True,
        "vllm_xargs": {"conveyor_forced": forced},
    }
    start = time.perf_counter()
    first = last = 0.0
    ids: list[int] = []
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            choices = json.loads(line[5:]).get("choices") or []
            if choices and choices[0].get("token_ids"):
                ids.extend(choices[0]["token_ids"])
                last = time.perf_counter()
                first = first or last
    return StreamResult(ids == forced, len(ids), first - start, last - first, last - start)


async def _direct(url: str, prompt_ids: list[list[int]], forced: list[list[int]]):
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        start = time.perf_counter()
        results = await asyncio.gather(
            *(_direct_stream(client, model, p, f) for p, f in zip(prompt_ids, forced, strict=True))
        )
        return results, time.perf_counter() - start


async def _rows(measure, streams: Sequence[int], say, name: str) -> list[dict]:
    rows = []
    for n in streams:
        await measure(min(n, 2))  # warm: first requests pay lazy init
        row = summarize_streams([await measure(n)])
        rows.append(row)
        say(
            f"{name} x{n}: {row['aggregate_tokens_per_s']:.1f} tok/s aggregate, "
            f"TTFT {row['ttft_mean_s'] * 1000:.0f} ms, exact {row['exact_streams']}/{n}"
        )
    return rows


async def run(streams: Sequence[int], tokens: int, quick: bool, say=None) -> dict:
    from transformers import AutoTokenizer

    from conveyor_common.server import stop_server
    from conveyor_common.types import Message
    from llm_worker.config import WorkerConfig
    from llm_worker.engines.base import GenerationRequest
    from llm_worker.engines.hf import build_hf_engine
    from llm_worker.engines.prepare import tokenize
    from llm_worker.model_cache import resolve
    from llm_worker.server import create_server

    say = say or common.progress("bench.engines")
    if not VLLM_PYTHON.is_file():
        raise SystemExit(f"needs {VLLM_PYTHON}: make install-vllm")
    source = resolve("")
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    n_max = max(streams)
    texts = prompts(n_max)
    engines: dict[str, list[dict]] = {}

    # hf first: its greedy outputs become every engine's forced completions.
    config = WorkerConfig(max_batch=n_max, max_new_tokens=tokens, dtype="float32")
    engine = await asyncio.to_thread(build_hf_engine, config)
    engine.prefix_cache.max_tokens = 0  # every request pays its full prefill, on every engine
    server, port = await create_server(config, engine=engine)
    target = f"127.0.0.1:{port}"
    try:
        completions = []
        for text in texts:
            request = GenerationRequest([Message("user", text)])
            completions.append(await _greedy(engine, request, tokens))
        say(f"hf: {len(completions)} greedy completions of {tokens} tokens")
        engines["hf"] = await _rows(
            lambda n: _streams(target, texts[:n], completions[:n]), streams, say, "hf"
        )
    finally:
        await stop_server(server, 0)
    forced = [tokenizer.encode(c, add_special_tokens=False) for c in completions]
    prompt_ids = [
        tokenize(tokenizer, GenerationRequest([Message("user", t)]), 8192, tokens).prompt
        for t in texts
    ]

    logs = Path(".cache/bench-engines")
    logs.mkdir(parents=True, exist_ok=True)
    port, metrics_port = free_port(), free_port()
    say("vllm: starting the worker with --engine vllm")
    with Subprocess(
        [
            str(VLLM_PYTHON), "-m", "llm_worker", "--engine", "vllm", "--port", str(port),
            "--metrics-port", str(metrics_port), "--max-batch", str(n_max), "--dtype", "float32",
            "--engine-args", json.dumps({"enable_prefix_caching": False}),
        ],
        logs / "vllm-worker.log",
        "the vllm worker",
    ) as proc:  # fmt: skip
        target = f"127.0.0.1:{port}"
        await wait_serving(target, proc)
        engines["vllm"] = await _rows(
            lambda n: _streams(target, texts[:n], completions[:n]), streams, say, "vllm"
        )

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    say("vLLM's OpenAI server: starting")
    with Subprocess(
        [
            str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server",
            "--model", source.path, "--host", "127.0.0.1", "--port", str(port),
            "--dtype", "float32", "--kv-cache-memory-bytes", str(1 << 30),
            "--max-num-seqs", str(n_max), "--no-enable-prefix-caching",
            "--logits-processors", "llm_worker.engines.vllm_forced:ForcedTokens",
        ],
        logs / "vllm-server.log",
        "vLLM's server",
    ) as proc:  # fmt: skip
        await asyncio.to_thread(wait_healthy, url, proc)
        openai_config = WorkerConfig(engine="openai", engine_url=url, max_new_tokens=tokens)
        server, wport = await create_server(openai_config)
        target = f"127.0.0.1:{wport}"
        try:
            # Alternating per concurrency level, so drift hits both alike.
            engines["openai→vllm"], engines["vLLM direct"] = [], []
            for n in streams:
                for name in ("openai→vllm", "vLLM direct"):
                    if name == "openai→vllm":

                        def measure(k):
                            return _streams(target, texts[:k], completions[:k])
                    else:

                        def measure(k):
                            return _direct(url, prompt_ids[:k], forced[:k])

                    engines[name] += await _rows(measure, [n], say, name)
        finally:
            await stop_server(server, 0)

    return {
        "benchmark": "engines",
        "date": common.now(),
        "machine": common.machine(),
        "config": {
            "model": source.label,
            "dtype": "float32",
            "tokens_per_stream": tokens,
            "streams": list(streams),
            "quick": quick,
            "prefix_caching": "off on every engine",
        },
        "engines": engines,
        "overhead": _overhead(engines),
    }


async def _greedy(engine, request, tokens: int) -> str:
    from dataclasses import replace

    from conveyor_common.types import Sampling

    text = ""
    request = replace(request, sampling=Sampling(max_new_tokens=tokens))
    async for item in engine.generate(request):
        text += getattr(item, "text", "")
    return text


def _overhead(engines: dict[str, list[dict]]) -> dict:
    """Each worker row against vLLM direct at the same stream count: the
    throughput it loses and the time to first token it adds, as fractions."""
    direct = {r["streams"]: r for r in engines.get("vLLM direct", [])}
    out = {}
    for name in ("openai→vllm", "vllm"):
        rows = []
        for r in engines.get(name, []):
            d = direct.get(r["streams"])
            if d is None:
                continue
            rows.append(
                {
                    "streams": r["streams"],
                    "throughput_loss": 1
                    - r["aggregate_tokens_per_s"] / d["aggregate_tokens_per_s"],
                    "ttft_added": r["ttft_mean_s"] / d["ttft_mean_s"] - 1,
                }
            )
        worst = max((max(x["throughput_loss"], x["ttft_added"]) for x in rows), default=None)
        out[name] = {
            "rows": rows,
            "worst": worst,
            "goal": GOAL_OVERHEAD,
            "met": worst is not None and worst <= GOAL_OVERHEAD,
        }
    return out


def markdown(results: dict) -> str:
    m, cfg = results["machine"], results["config"]
    cpu = common.cpu_name(m)
    direct = {r["streams"]: r for r in results["engines"].get("vLLM direct", [])}
    hf = {r["streams"]: r for r in results["engines"].get("hf", [])}
    out = [
        "# The worker on each engine",
        "",
        f"Machine: {cpu}, {m['cpu_count']} CPUs, no GPU. Model: {cfg['model']}, "
        f"{cfg['dtype']}; {cfg['tokens_per_stream']} forced tokens per stream (hf's greedy "
        f"output), prefix caching {cfg['prefix_caching']}. Date: {results['date']}.",
        "",
        "| engine | streams | aggregate tok/s | per-stream tok/s | TTFT mean | TTFT p90 "
        "| × hf | × vLLM direct | exact text |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, rows in results["engines"].items():
        for r in rows:
            n = r["streams"]
            vs_hf = r["aggregate_tokens_per_s"] / hf[n]["aggregate_tokens_per_s"] if n in hf else 0
            vs_d = (
                f"{r['aggregate_tokens_per_s'] / direct[n]['aggregate_tokens_per_s']:.3f}×"
                if n in direct
                else ""
            )
            out.append(
                f"| {name} | {n} | {r['aggregate_tokens_per_s']:.1f} | "
                f"{r['per_stream_tokens_per_s']:.1f} | {r['ttft_mean_s'] * 1000:.0f} ms | "
                f"{r['ttft_p90_s'] * 1000:.0f} ms | {vs_hf:.2f}× | {vs_d} | "
                f"{r['exact_streams']}/{n} |"
            )
    out += ["", "## Overhead of the worker in front of vLLM (goal ≤ 3 %)", ""]
    for name, o in results["overhead"].items():
        parts = ", ".join(
            f"x{x['streams']}: {100 * x['throughput_loss']:+.1f} % tok/s lost, "
            f"{100 * x['ttft_added']:+.1f} % TTFT"
            for x in o["rows"]
        )
        verdict = "met" if o["met"] else "MISSED"
        worst = f"{100 * o['worst']:.1f} %" if o["worst"] is not None else "n/a"
        out.append(f"- {name}: {parts}; worst {worst} — {verdict}")
    out.append(
        "\nvllm runs AsyncLLM in the worker's process; vLLM direct goes through vLLM's own "
        "API server, so that row compares two front ends of one engine, while openai→vllm "
        "adds the worker to the very server of the direct row."
    )
    return "\n".join(out) + "\n"


def parse_args(
    argv: Sequence[str] | None, prog: str, full: Sequence[int], out: str
) -> tuple[tuple[int, ...], int, bool, str]:
    """The flags every side-by-side worker bench takes: (streams, tokens, quick, out)."""
    ap = argparse.ArgumentParser(prog=prog)
    default = ",".join(map(str, full))
    ap.add_argument("--streams", help=f"concurrency levels, comma-separated (default {default})")
    ap.add_argument("--tokens", type=int, help="tokens per stream (default 128; quick 16)")
    ap.add_argument("--quick", action="store_true", help="1 and 4 streams, 16 tokens")
    ap.add_argument("--out", default=out, help="writes <out>.md and .json")
    args = ap.parse_args(argv)
    streams = (
        tuple(int(s) for s in args.streams.split(","))
        if args.streams
        else tuple(QUICK_STREAMS if args.quick else full)
    )
    return streams, args.tokens or (16 if args.quick else 128), args.quick, args.out


def main(argv: Sequence[str] | None = None) -> int:
    streams, tokens, quick, out = parse_args(
        argv, "python -m bench.worker.engines", FULL_STREAMS, "bench/results/engines"
    )
    results = asyncio.run(run(streams, tokens, quick))
    common.publish(results, out, markdown(results))
    exact = all(
        r["exact_streams"] == r["streams"] for rows in results["engines"].values() for r in rows
    )
    return 0 if exact else 1


if __name__ == "__main__":
    from bench.worker.servers import stop_workers_on_sigterm

    stop_workers_on_sigterm()
    sys.exit(main())
