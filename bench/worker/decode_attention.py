"""Decode attention alone: the worker's CPU kernel (`--decode-attention
auto`) against torch's SDPA as the lean step calls it (`--decode-attention
sdpa`: the padded cache with its mask), at SmolLM2-135M's shapes (9 query
heads on 3 kv heads of 64, 30 layers), in one run.

    python -m bench.worker.decode_attention [--rows 1,16] [--rounds 15]
                                            [--quick] [--out bench/results/decode_attention]

Rows take the lengths of the worker bench's 16 prompts (74 to 507 tokens)
plus 64 generated, left-padded to the longest as the engine pads them; one
row takes the longest. Each dtype (float32, and bfloat16 on CPUs with native
bf16) times 30 layers' attention per way, alternating for `--rounds` rounds,
every layer's keys and values its own (no cache reuse across layers), and
checks the two agree within the dtype's rounding.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Sequence

from bench import common

# Token counts of bench.worker's 16 prompts under SmolLM2's chat template.
PROMPT_TOKENS = (461, 207, 507, 328, 297, 319, 361, 310, 108, 312, 324, 231, 165, 74, 138, 309)
GENERATED = 64
HEADS, KV_HEADS, HEAD_DIM, LAYERS = 9, 3, 64, 30
TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2}


def measure(kernel, rows: int, dtype_name: str, rounds: int) -> dict:
    import torch
    import torch.nn.functional as F

    dtype = getattr(torch, dtype_name)
    lengths = sorted(PROMPT_TOKENS, reverse=True)[:1] if rows == 1 else PROMPT_TOKENS[:rows]
    lengths = torch.tensor(lengths) + GENERATED
    columns = int(lengths.max())
    g = torch.Generator().manual_seed(0)
    # As the cache holds them: views of buffers with spare capacity.
    kv = [
        tuple(
            torch.randn(rows, KV_HEADS, columns + 32, HEAD_DIM, generator=g).to(dtype)[
                :, :, :columns
            ]
            for _ in range(2)
        )
        for _ in range(LAYERS)
    ]
    q = torch.randn(rows, HEADS, 1, HEAD_DIM, generator=g).to(dtype)
    starts = columns - lengths
    seen = (torch.arange(columns)[None, :] >= starts[:, None])[:, None, None, :]
    mask = torch.zeros(seen.shape, dtype=dtype).masked_fill_(~seen, float("-inf"))
    scale = HEAD_DIM**-0.5
    # The lean step's SDPA call: GQA in SDPA for bf16, query heads packed per
    # kv head for float32 (LeanDecode._attend); no mask for one unpadded row.
    packed = q.reshape(rows, KV_HEADS, HEADS // KV_HEADS, HEAD_DIM)
    attn_mask = mask if rows > 1 else None

    def sdpa(k, v):
        if dtype == torch.bfloat16 or attn_mask is None:
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, scale=scale, enable_gqa=True
            ).reshape(rows, HEADS, HEAD_DIM)
        out = F.scaled_dot_product_attention(packed, k, v, attn_mask=attn_mask, scale=scale)
        return out.reshape(rows, HEADS, HEAD_DIM)

    def ours(k, v):
        return kernel(q[:, :, 0], k, v, starts, scale)

    ways = {"sdpa": sdpa, "kernel": ours}
    times: dict[str, list[float]] = {name: [] for name in ways}
    with torch.inference_mode():
        want, got = sdpa(*kv[0]).float(), ours(*kv[0]).float()
        diff = float((want - got).abs().max())
        for r in range(rounds + 2):
            for name, way in ways.items():
                start = time.perf_counter()
                for k, v in kv:
                    way(k, v)
                if r >= 2:  # two warm-up rounds
                    times[name].append(time.perf_counter() - start)
    medians = {name: 1000 * statistics.median(t) for name, t in times.items()}
    real = int(lengths.sum()) * LAYERS * KV_HEADS * HEAD_DIM * 2 * torch.finfo(dtype).bits // 8
    return {
        "dtype": dtype_name,
        "rows": rows,
        "columns": columns,
        "real_columns": int(lengths.sum()),
        "sdpa_ms": medians["sdpa"],
        "kernel_ms": medians["kernel"],
        "speedup": medians["sdpa"] / medians["kernel"],
        "kernel_gbs": real / medians["kernel"] / 1e6,
        "max_diff": diff,
        "agrees": diff <= TOLERANCE[dtype_name],
    }


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        "# Decode attention: the CPU kernel against SDPA",
        "",
        f"{results['date']} on {common.cpu_name(m)} ({m['cpu_count']} cores), torch "
        f"{results['torch']}; 30 layers of 9 query heads on 3 kv heads of 64; "
        f"{results['rounds']} alternating rounds, medians.",
        "",
        "| dtype | rows | columns (real / padded) | SDPA ms | kernel ms | SDPA / kernel "
        "| kernel reads real KV at | max diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['dtype']} | {r['rows']} | {r['real_columns']} / {r['columns'] * r['rows']} "
            f"| {r['sdpa_ms']:.1f} | {r['kernel_ms']:.1f} | ×{r['speedup']:.2f} "
            f"| {r['kernel_gbs']:.1f} GB/s | {r['max_diff']:.1e}"
            f"{'' if r['agrees'] else ' **disagrees**'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    import torch

    from llm_worker.decode_attention import load_kernel
    from llm_worker.loader import cpu_has_native_bf16

    rows, rounds, out = common.kernel_bench_args(
        argv,
        "bench.worker.decode_attention",
        __doc__,
        "1,16",
        15,
        "rows per step, comma-separated (at most 16)",
    )
    if any(not 1 <= r <= len(PROMPT_TOKENS) for r in rows):
        print(f"--rows: each between 1 and {len(PROMPT_TOKENS)}", file=sys.stderr)
        return 2
    kernel = load_kernel()
    if kernel is None:
        print("the decode-attention kernel did not build here (see the log)", file=sys.stderr)
        return 1
    say = common.progress("decode_attention")
    dtypes = ["float32", *(["bfloat16"] if cpu_has_native_bf16() else [])]
    measured = []
    for dtype in dtypes:
        for n in rows:
            say(f"{dtype}, {n} rows")
            measured.append(measure(kernel, n, dtype, rounds))
    results = {
        "date": common.now(),
        "machine": common.machine(),
        "torch": torch.__version__,
        "rounds": rounds,
        "rows": measured,
    }
    common.publish(results, out, markdown(results))
    return 0 if all(r["agrees"] for r in measured) else 1


if __name__ == "__main__":
    sys.exit(main())
