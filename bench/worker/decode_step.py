"""The decode step itself, the lean loop (`--decode-step auto`) against the
transformers forward (`--decode-step transformers`), on the model as the
worker loads it (packing as `--pack-linears auto` decides), the same tokens
and copies of one cache, in one run.

    python -m bench.worker.decode_step [--rows 1,4,16] [--context 300]
                                       [--steps 10] [--rounds 8] [--quick]
                                       [--out bench/results/decode_step]

For each dtype (float32, and bfloat16 on CPUs with native bf16) and batch
size, both steps decode from copies of one batch (rows of
`--context` tokens and fewer, left-padded as the engine pads them), alternating every
`--steps` steps for `--rounds` rounds (drift in a shared machine hits
both); each reports its median step, and the run checks that the two
computed the same logits at the end of every round (padded bf16 rows, where
one attention kernel differs: within bf16's rounding, `BF16_LOGIT_SHARE`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence

from bench import common


def measure(model, ids: list[int], rows: int, steps: int, rounds: int) -> dict:
    """Median step (ms) of each way, and whether every step's logits matched."""
    import torch

    from llm_worker.decode_step import LeanDecode, ModelDecode
    from llm_worker.kv_batch import KVBatch

    ways = {"transformers": ModelDecode(model), "lean": LeanDecode(model)}
    device = model.get_input_embeddings().weight.device
    with torch.inference_mode():
        # Rows of different lengths, prefilled alone and left-padded into one
        # batch, as the engine's are.
        alone, first = [], []
        for i in range(rows):
            out = model(input_ids=torch.tensor([ids[: len(ids) - 3 * i]], device=device))
            alone.append(KVBatch.single(out.past_key_values))
            first.append(out.logits[:, -1:].argmax(-1))
        batch = KVBatch.concat(alone)
        batches = {name: batch.select(list(range(rows))) for name in ways}  # own copies
        tokens = dict.fromkeys(ways, torch.cat(first))
        times: dict[str, list[float]] = {name: [] for name in ways}
        identical, worst = True, 0.0
        for _ in range(rounds):
            logits = {}
            for name, step in ways.items():
                kv = batches[name]
                for _ in range(steps):
                    start = time.perf_counter()
                    out = step(tokens[name], kv.lengths()[:, None], kv.cache, kv.step_mask())
                    kv.grew()
                    tokens[name] = out.argmax(-1, keepdim=True)
                    tokens[name].tolist()  # waits for the device, as the engine does
                    times[name].append(time.perf_counter() - start)
                logits[name] = out
            identical &= torch.equal(logits["lean"], logits["transformers"])
            # Padded bf16 rows on CPU differ at bf16's rounding (decode_step.py).
            ours, theirs = logits["lean"].float(), logits["transformers"].float()
            worst = max(worst, float((ours - theirs).abs().max() / theirs.abs().max()))
    plain = statistics.median(times["transformers"]) * 1000
    lean = statistics.median(times["lean"]) * 1000
    return {
        "rows": rows,
        "transformers_step_ms": plain,
        "lean_step_ms": lean,
        "speedup": plain / lean,
        "identical_logits": identical,
        "max_logit_diff_share": worst,  # of the largest logit, at rounds' ends
    }


def run(
    rows: list[int], context: int, steps: int, rounds: int, dtypes: list[str], say=None
) -> dict:
    import torch

    from llm_worker.config import WorkerConfig
    from llm_worker.loader import load

    say = say or common.progress("decode_step")
    text = "\n\n".join(common.stdlib_docstrings("json collections itertools re typing".split()))
    results = []
    label = ""
    for dtype in dtypes:
        model, tokenizer, label = load(WorkerConfig(dtype=dtype))
        ids = tokenizer.encode(text, add_special_tokens=False)[:context]
        for n in rows:
            say(f"{dtype}, {n} rows")
            results.append({"dtype": dtype, **measure(model, ids, n, steps, rounds)})
        del model
    return {
        "benchmark": "decode_step",
        "date": common.now(),
        "machine": common.machine(),
        "config": {
            "model": label,
            "context": context,
            "threads": torch.get_num_threads(),
            "steps": steps,
            "rounds": rounds,
        },
        "rows": results,
    }


def markdown(results: dict) -> str:
    m, c = results["machine"], results["config"]
    lines = [
        "# Decode step: the lean loop against the transformers forward",
        "",
        f"{results['date']} on {common.cpu_name(m)} ({m['cpu_count']} cores), "
        f"{c['threads']} threads, {c['model']}, {c['context']}-token context; "
        f"median of {c['rounds']}×{c['steps']} alternating steps each.",
        "",
        "| dtype | rows | transformers step | lean step | speedup | same logits |",
        "|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['dtype']} | {r['rows']} | {r['transformers_step_ms']:.1f} ms "
            f"| {r['lean_step_ms']:.1f} ms | {r['speedup']:.2f}× "
            f"| {_same(r)} |"
        )
    return "\n".join(lines) + "\n"


def _agrees(row: dict) -> bool:
    """Bit for bit, or (padded bf16 rows) within the bound the tests hold."""
    from llm_worker.decode_step import BF16_LOGIT_SHARE

    if row["identical_logits"]:
        return True
    return row["dtype"] == "bfloat16" and row["max_logit_diff_share"] <= BF16_LOGIT_SHARE


def _same(row: dict) -> str:
    if row["identical_logits"]:
        return "yes"
    return f"within {row['max_logit_diff_share']:.1%} of the largest logit"


def main(argv: Sequence[str] | None = None) -> int:
    from llm_worker.loader import cpu_has_native_bf16

    ap = argparse.ArgumentParser(
        prog="python -m bench.worker.decode_step", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--rows", default="1,4,16", help="rows per step, comma-separated")
    ap.add_argument("--context", type=int, default=300, help="prompt tokens before the steps")
    ap.add_argument("--steps", type=int, default=10, help="decode steps per round")
    ap.add_argument("--rounds", type=int, default=8, help="alternating rounds per way")
    ap.add_argument("--quick", action="store_true", help="rows 1 and 2, context 64, 2×2 steps")
    ap.add_argument("--out", default="bench/results/decode_step", help="writes <out>.md and .json")
    args = ap.parse_args(argv)
    dtypes = ["float32", *(["bfloat16"] if cpu_has_native_bf16() else [])]
    if args.quick:
        rows, context, steps, rounds = [1, 2], 64, 2, 2
    else:
        rows = [int(r) for r in args.rows.split(",")]
        context, steps, rounds = args.context, args.steps, args.rounds
    results = run(rows, context, steps, rounds, dtypes)
    common.publish(results, args.out, markdown(results))
    return 0 if all(_agrees(r) for r in results["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
