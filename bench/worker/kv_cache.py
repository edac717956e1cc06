"""Decode step time with the engine's batch cache (GrowingLayer: append in
place) against transformers' DynamicCache (concatenate the whole history
every step), on the same model and the same tokens, in one run.

    python -m bench.worker.kv_cache [--contexts 300,2000] [--batches 1,8]
                                    [--steps 10] [--rounds 8] [--quick]
                                    [--model ID] [--device auto|cpu|cuda] [--threads N]
                                    [--out bench/results/kv_cache]

For each context length and batch size, both caches start from copies of one
prefill and decode the same steps, alternating every `--steps` steps for
`--rounds` rounds; each reports its median step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence

from bench import common


def _step_times(model, cache, batch: int, steps: int, device) -> list[float]:
    import torch

    token = torch.full((batch, 1), 5, device=device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        out.logits[:, -1].argmax(-1).tolist()  # waits for the device, as the engine does
        times.append(time.perf_counter() - start)
    return times


def measure(model, ids: list[int], batch: int, steps: int, rounds: int) -> dict:
    """Median decode step (ms) of each cache over `rounds` alternating rounds
    of `steps` steps (the context grows by steps × rounds on the way)."""
    import torch
    from transformers import DynamicCache

    from llm_worker.kv_batch import growing_cache

    device = model.get_input_embeddings().weight.device
    with torch.inference_mode():
        prefill = model(input_ids=torch.tensor([ids] * batch, device=device), use_cache=True)
        base = [(layer.keys, layer.values) for layer in prefill.past_key_values.layers]
        caches = {
            "dynamic": DynamicCache([(k.clone(), v.clone()) for k, v in base], config=model.config),
            "growing": growing_cache([(k.clone(), v.clone()) for k, v in base]),
        }
        times: dict[str, list[float]] = {name: [] for name in caches}
        for _ in range(rounds):  # short alternating rounds: drift in the machine hits both
            for name, cache in caches.items():
                times[name] += _step_times(model, cache, batch, steps, device)
    dynamic = statistics.median(times["dynamic"]) * 1000
    growing = statistics.median(times["growing"]) * 1000
    return {
        "context": len(ids),
        "batch": batch,
        "dynamic_step_ms": dynamic,
        "growing_step_ms": growing,
        "speedup": dynamic / growing,
    }


def run(
    contexts: list[int],
    batches: list[int],
    steps: int,
    rounds: int,
    model_name: str,
    device: str,
    threads: int,
) -> dict:
    from llm_worker.config import WorkerConfig
    from llm_worker.loader import load

    say = common.progress("kv_cache")
    model, tokenizer, label = load(WorkerConfig(model=model_name, device=device, threads=threads))
    text = "\n\n".join(common.stdlib_docstrings("json collections itertools re typing".split()))
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) < max(contexts):
        raise ValueError(f"only {len(ids)} tokens of text, {max(contexts)} asked for")
    rows = []
    for context in contexts:
        for batch in batches:
            say(f"context {context}, batch {batch}")
            rows.append(measure(model, ids[:context], batch, steps, rounds))
    import torch

    return {
        "date": common.now(),
        "machine": common.machine(),
        "config": {
            "model": label,
            "device": str(model.device),
            "dtype": str(model.dtype).removeprefix("torch."),
            "threads": torch.get_num_threads(),
            "steps": steps,
            "rounds": rounds,
        },
        "rows": rows,
    }


def markdown(results: dict) -> str:
    m, c = results["machine"], results["config"]
    lines = [
        "# Decode step: append in place vs concatenate",
        "",
        f"{results['date']} on {m['cpu_model'] or m['processor']} ({m['cpu_count']} cores), "
        f"{c['device']}, {c['dtype']}, {c['threads']} threads, {c['model']}; "
        f"median of {c['rounds']}×{c['steps']} steps each.",
        "",
        "| context | batch | DynamicCache step | GrowingLayer step | speedup |",
        "|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['context']} | {r['batch']} | {r['dynamic_step_ms']:.1f} ms "
            f"| {r['growing_step_ms']:.1f} ms | {r['speedup']:.2f}× |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.worker.kv_cache", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--contexts", default="300,2000", help="prompt tokens, comma-separated")
    ap.add_argument("--batches", default="1,8", help="rows per step, comma-separated")
    ap.add_argument("--steps", type=int, default=10, help="decode steps per round")
    ap.add_argument("--rounds", type=int, default=8, help="alternating rounds per cache")
    ap.add_argument("--quick", action="store_true", help="context 64, batch 1 and 2, 4 steps")
    ap.add_argument("--model", default="", help="model id or path (default: the embedded one)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    ap.add_argument("--out", default="bench/results/kv_cache", help="writes <out>.md and .json")
    args = ap.parse_args(argv)
    if args.quick:
        contexts, batches, steps, rounds = [64], [1, 2], 2, 2
    else:
        contexts = [int(c) for c in args.contexts.split(",")]
        batches = [int(b) for b in args.batches.split(",")]
        steps, rounds = args.steps, args.rounds
    results = run(contexts, batches, steps, rounds, args.model, args.device, args.threads)
    common.publish(results, args.out, markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
