"""Decode linears alone: the worker's CPU kernel (`--decode-linear auto`)
against torch's linear on the plain weight and on oneDNN's packed copy
(`--decode-linear torch`, packed or not per `--pack-linears`), over every
linear of one decode step of the model as the worker loads it, in one run.

    python -m bench.worker.decode_linear [--rows 1,4,16] [--rounds 9]
                                         [--quick] [--out bench/results/decode_linear]

A decode step reads each of its ~120 linears' weights once, in order, and
the whole model (538 MB in float32 for SmolLM2-135M) does not fit in any
cache, so each way runs the step's whole sequence of linears (q/k/v fused,
o, gate/up fused, down per layer, then lm_head) on inputs of `rows` rows,
alternating ways for `--rounds` rounds; medians. A read-bandwidth reading
(the peers bench's) gives the ceiling: weight bytes over bandwidth. Each
way's outputs are checked against the plain linear's within the dtype's
rounding.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Sequence

from bench import common

TOLERANCE = {"float32": 1e-5, "bfloat16": 8e-3}  # of the largest output


def step_linears(model) -> list:
    """The plain linears one decode step calls, in the order it calls them."""
    from llm_worker.fused_linear import FUSIONS, fused_of

    (attn, qkv, qkv_parts), (mlp, gate_up, gate_up_parts) = FUSIONS
    out = []
    for layer in model.model.layers:
        for owner, fused, parts in ((attn, qkv, qkv_parts), (mlp, gate_up, gate_up_parts)):
            module = getattr(layer, owner)
            joint = fused_of(module, fused)
            out.extend([joint.linear] if joint is not None else [getattr(module, p) for p in parts])
            if owner == attn:
                out.append(layer.self_attn.o_proj)
            else:
                out.append(layer.mlp.down_proj)
    out.append(model.lm_head)
    return out


def measure(linears: list, kernel, rows: int, dtype_name: str, rounds: int) -> dict:
    import torch

    from llm_worker.packed_linear import BATCH_HINT, PackedLinear

    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(rows)
    xs = [torch.randn(rows, lin.in_features, generator=g).to(dtype) for lin in linears]
    ways = {
        "plain": [lin.forward for lin in linears],
        "packed": [PackedLinear(lin, BATCH_HINT[dtype]).forward for lin in linears],
        "kernel": [(lambda x, w=lin.weight, b=lin.bias: kernel(x, w, b)) for lin in linears],
    }
    times: dict[str, list[float]] = {name: [] for name in ways}
    worst = {name: 0.0 for name in ways}
    with torch.inference_mode():
        for name, calls in ways.items():  # agreement, on a few linears of each shape
            for call, lin, x in list(zip(calls, linears, xs, strict=True))[:5] + [
                (calls[-1], linears[-1], xs[-1])
            ]:
                want = lin(x).float()
                share = float((call(x).float() - want).abs().max() / want.abs().max())
                worst[name] = max(worst[name], share)
        for r in range(rounds + 1):
            for name, calls in ways.items():
                start = time.perf_counter()
                for call, x in zip(calls, xs, strict=True):
                    call(x)
                if r:  # one warm-up round
                    times[name].append(time.perf_counter() - start)
    ms = {name: 1000 * statistics.median(t) for name, t in times.items()}
    weight_bytes = sum(lin.weight.nbytes for lin in linears)
    return {
        "dtype": dtype_name,
        "rows": rows,
        "weight_mb": weight_bytes / 1e6,
        **{f"{name}_ms": v for name, v in ms.items()},
        **{f"{name}_gbs": weight_bytes / v / 1e6 for name, v in ms.items()},
        "kernel_vs_best_torch": min(ms["plain"], ms["packed"]) / ms["kernel"],
        "max_diff_share": worst,
        "agrees": all(v <= TOLERANCE[dtype_name] for v in worst.values()),
    }


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        "# Decode linears: the CPU kernel against torch's linears",
        "",
        f"{results['date']} on {common.cpu_name(m)} ({m['cpu_count']} cores), torch "
        f"{results['torch']}, {results['threads']} threads; every linear of one decode "
        f"step of {results['model']}; read bandwidth {results['bandwidth_gbs']:.1f} GB/s; "
        f"{results['rounds']} alternating rounds, medians.",
        "",
        "| dtype | rows | weights | torch plain | torch packed | kernel | kernel × best torch "
        "| kernel streams at | bandwidth bound |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        bound = r["weight_mb"] / results["bandwidth_gbs"]  # MB over GB/s: ms
        lines.append(
            f"| {r['dtype']} | {r['rows']} | {r['weight_mb']:.0f} MB | {r['plain_ms']:.1f} ms "
            f"| {r['packed_ms']:.1f} ms | {r['kernel_ms']:.1f} ms "
            f"| ×{r['kernel_vs_best_torch']:.2f} "
            f"| {r['kernel_gbs']:.1f} GB/s | {bound:.1f} ms"
            f"{'' if r['agrees'] else ' **disagrees**'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    import torch

    from bench.worker.peers import memory_bandwidth_gbs
    from llm_worker.config import WorkerConfig
    from llm_worker.decode_linear import load_kernel
    from llm_worker.loader import cpu_has_native_bf16, load

    rows, rounds, out = common.kernel_bench_args(
        argv, "bench.worker.decode_linear", __doc__, "1,2,4,8,16", 9
    )
    kernel = load_kernel()
    if kernel is None:
        print("the decode-linear kernel did not build here (see the log)", file=sys.stderr)
        return 1
    say = common.progress("decode_linear")
    dtypes = ["float32", *(["bfloat16"] if cpu_has_native_bf16() else [])]
    bandwidth = memory_bandwidth_gbs()
    measured, label = [], ""
    for dtype in dtypes:
        # The worker's layout (q/k/v and gate/up fused), every linear plain.
        model, _, label = load(WorkerConfig(dtype=dtype, decode_linear="torch", pack_linears="off"))
        linears = step_linears(model)
        for n in rows:
            say(f"{dtype}, {n} rows")
            measured.append(measure(linears, kernel, n, dtype, rounds))
        del model, linears
    results = {
        "date": common.now(),
        "machine": common.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "model": label,
        "bandwidth_gbs": bandwidth,
        "rounds": rounds,
        "rows": measured,
    }
    common.publish(results, out, markdown(results))
    return 0 if all(r["agrees"] for r in measured) else 1


if __name__ == "__main__":
    sys.exit(main())
