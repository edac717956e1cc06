"""The decode step itself, the lean loop (`--decode-step auto`) against the
transformers forward, on the model as the worker loads it (q/k/v and
gate/up fused, linears on the decode-linear kernel where it builds); against
the lean loop on the same weights with every linear apart (as
`--decode-step transformers` loads them); and against the lean loop on
torch's linears (`--decode-linear torch`, packed as `--pack-linears auto`
decides): the same tokens and copies of one cache, in one run.

    python -m bench.worker.decode_step [--rows 1,4,16] [--context 300]
                                       [--steps 10] [--rounds 8] [--quick]
                                       [--out bench/results/decode_step]

For each dtype (float32, and bfloat16 on CPUs with native bf16) and batch
size, the four ways decode the same tokens (the forward's greedy picks)
from copies of one batch (rows of `--context` tokens and fewer, left-padded
as the engine pads them), alternating every `--steps` steps for `--rounds`
rounds (drift in a shared machine hits all four); each reports its median
step. The run checks that the lean step computed the forward's logits at
the end of every round (padded bf16 rows, where one attention kernel
differs: within bf16's rounding, `BF16_LOGIT_SHARE`), reports whether the
fused linears gave the same logits as the linears apart, and how far the
kernel's logits are from torch's linears' (float rounding: sums in another
order).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence

from bench import common


def _prefilled(model, ids: list[int], rows: int):
    """Rows of different lengths, prefilled alone and left-padded into one
    batch, as the engine's are; and each row's first greedy token."""
    import torch

    from llm_worker.kv_batch import KVBatch

    device = model.get_input_embeddings().weight.device
    alone, first = [], []
    for i in range(rows):
        out = model(input_ids=torch.tensor([ids[: len(ids) - 3 * i]], device=device))
        alone.append(KVBatch.single(out.past_key_values))
        first.append(out.logits[:, -1:].argmax(-1))
    return KVBatch.concat(alone), torch.cat(first)


def _share(ours, theirs) -> float:
    """The largest logit difference, as a share of the largest logit."""
    ours, theirs = ours.float(), theirs.float()
    return float((ours - theirs).abs().max() / theirs.abs().max())


def measure(
    model, apart, torch_linears, ids: list[int], rows: int, steps: int, rounds: int
) -> dict:
    """Median step (ms) of each way, and whether their logits matched at the
    end of every round. `model` is the worker's (projections fused, linears
    on the decode-linear kernel where it builds), `apart` the same weights
    with every linear on its own (`lean_apart`), `torch_linears` the worker's
    layout on torch's linears, packed as `--pack-linears auto` decides."""
    import torch

    from llm_worker.decode_step import LeanDecode, ModelDecode

    ways = {
        "transformers": (model, ModelDecode(model)),
        "lean": (model, LeanDecode(model)),
        "lean_apart": (apart, LeanDecode(apart)),
        "lean_torch_linears": (torch_linears, LeanDecode(torch_linears)),
    }
    with torch.inference_mode():
        prefilled = {id(m): _prefilled(m, ids, rows) for m in (model, apart, torch_linears)}
        batches = {
            name: prefilled[id(m)][0].select(list(range(rows))) for name, (m, _) in ways.items()
        }
        # Every way is fed the forward's greedy tokens (it runs first in each
        # round): rows whose bf16 rounding picks another token would otherwise
        # decode other text, and their logits compare nothing.
        token = prefilled[id(model)][1]
        times: dict[str, list[float]] = {name: [] for name in ways}
        identical, fused_identical, worst, fused_worst, kernel_worst = True, True, 0.0, 0.0, 0.0
        for _ in range(rounds):
            logits, fed = {}, []
            for name, (_, step) in ways.items():
                kv = batches[name]
                for i in range(steps):
                    start = time.perf_counter()
                    tokens = fed[i] if name != "transformers" else token
                    out = step(tokens, kv.lengths()[:, None], kv.cache, kv.step_mask())
                    kv.grew()
                    picked = out.argmax(-1, keepdim=True)
                    picked.tolist()  # waits for the device, as the engine does
                    times[name].append(time.perf_counter() - start)
                    if name == "transformers":
                        fed.append(token)
                        token = picked
                logits[name] = out
            identical &= torch.equal(logits["lean"], logits["transformers"])
            # Padded bf16 rows on CPU differ at bf16's rounding (decode_step.py).
            worst = max(worst, _share(logits["lean"], logits["transformers"]))
            fused_identical &= torch.equal(logits["lean"], logits["lean_apart"])
            fused_worst = max(fused_worst, _share(logits["lean"], logits["lean_apart"]))
            kernel_worst = max(kernel_worst, _share(logits["lean"], logits["lean_torch_linears"]))
    ms = {name: statistics.median(t) * 1000 for name, t in times.items()}
    return {
        "rows": rows,
        "transformers_step_ms": ms["transformers"],
        "lean_step_ms": ms["lean"],
        "speedup": ms["transformers"] / ms["lean"],
        "identical_logits": identical,
        "max_logit_diff_share": worst,  # of the largest logit, at rounds' ends
        "apart_step_ms": ms["lean_apart"],
        "fusion_speedup": ms["lean_apart"] / ms["lean"],
        "fused_identical_logits": fused_identical,
        "fused_logit_diff_share": fused_worst,
        "torch_linears_step_ms": ms["lean_torch_linears"],
        "kernel_speedup": ms["lean_torch_linears"] / ms["lean"],
        "kernel_logit_diff_share": kernel_worst,
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
        # --decode-step transformers loads the linears apart (fused_linear.py).
        apart, _, _ = load(WorkerConfig(dtype=dtype, decode_step="transformers"))
        torch_linears, _, _ = load(WorkerConfig(dtype=dtype, decode_linear="torch"))
        ids = tokenizer.encode(text, add_special_tokens=False)[:context]
        for n in rows:
            say(f"{dtype}, {n} rows")
            results.append(
                {"dtype": dtype, **measure(model, apart, torch_linears, ids, n, steps, rounds)}
            )
        del model, apart, torch_linears
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
        "| dtype | rows | transformers step | lean step | speedup | same logits "
        "| lean, linears apart | fusion speedup | fused: same logits "
        "| lean, torch's linears | kernel speedup | kernel: logits within |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        fused_same = (
            "yes"
            if r["fused_identical_logits"]
            else f"within {r['fused_logit_diff_share']:.1%} of the largest logit"
        )
        lines.append(
            f"| {r['dtype']} | {r['rows']} | {r['transformers_step_ms']:.1f} ms "
            f"| {r['lean_step_ms']:.1f} ms | {r['speedup']:.2f}× "
            f"| {_same(r)} | {r['apart_step_ms']:.1f} ms | {r['fusion_speedup']:.2f}× "
            f"| {fused_same} | {r['torch_linears_step_ms']:.1f} ms | {r['kernel_speedup']:.2f}× "
            f"| {r['kernel_logit_diff_share']:.1%} of the largest logit |"
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
