"""One decode step of the default model, bare (no engine, no gRPC), four
ways side by side: transformers' DynamicCache and StaticCache eager, and
StaticCache under torch.compile (inductor, static shapes), at 1 and 16 rows,
in bfloat16 and float32. It measures what a static-cache compiled step, the
next step for issue 14's per-step overhead, would buy before the engine's
batch cache is reworked for it.

    python -m bench.worker.compiled_step [--quick]

Writes bench/results/compiled_step.{md,json}. Each configuration takes the
median of the steps after the first ten (compilation and warm-up excluded;
the compile time is reported apart).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench import common

OUT = Path("bench/results/compiled_step")
CONTEXT = 300  # prompt tokens before the measured steps, as the peers bench


def _step_ms(model, rows: int, variant: str, steps: int, dtype) -> tuple[float, float]:
    """(median ms per decode step, seconds spent on the first step)."""
    import torch
    from transformers import DynamicCache, StaticCache

    config = model.config
    torch.manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (rows, CONTEXT))
    if variant == "dynamic":
        cache = DynamicCache()
    else:
        cache = StaticCache(
            config=config,
            max_batch_size=rows,
            max_cache_len=CONTEXT + steps + 8,
            device="cpu",
            dtype=dtype,
        )
    forward = torch.compile(model, dynamic=False) if variant == "static+compile" else model
    times = []
    with torch.no_grad():
        out = model(
            input_ids=ids,
            past_key_values=cache,
            use_cache=True,
            cache_position=torch.arange(CONTEXT),
        )
        token = out.logits[:, -1:].argmax(-1)
        for i in range(steps):
            start = time.perf_counter()
            out = forward(
                input_ids=token,
                past_key_values=cache,
                use_cache=True,
                cache_position=torch.tensor([CONTEXT + i]),
            )
            token = out.logits[:, -1:].argmax(-1)
            times.append(time.perf_counter() - start)
    measured = sorted(times[10:])
    return 1000 * measured[len(measured) // 2], times[0]


def main(argv=None) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from llm_worker.model_cache import resolve

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="bf16 and 1 row only")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    say = common.progress("compiled_step")
    torch.set_num_threads(2 if torch.get_num_threads() >= 2 else 1)
    steps = 25 if args.quick else 40
    dtypes = (
        {"bf16": torch.bfloat16} if args.quick else {"bf16": torch.bfloat16, "f32": torch.float32}
    )
    rows_list = (1,) if args.quick else (1, 16)
    rows = []
    for name, dtype in dtypes.items():
        model = AutoModelForCausalLM.from_pretrained(resolve("").path, dtype=dtype).eval()
        for batch in rows_list:
            row = {"dtype": name, "rows": batch}
            for variant in ("dynamic", "static", "static+compile"):
                ms, first = _step_ms(model, batch, variant, steps, dtype)
                row[variant] = ms
                if variant == "static+compile":
                    row["compile_s"] = first
                say(f"{name} {batch} rows {variant}: {ms:.1f} ms/step")
            rows.append(row)
    results = {"machine": common.machine(), "date": common.now(), "rows": rows}
    m = results["machine"]
    lines = [
        "# One decode step, bare model",
        "",
        f"{common.cpu_name(m)} ({m['cpu_count']} CPUs), {results['date']}, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, {CONTEXT}-token context; "
        "median ms per step (tok/s per row).",
        "",
        "| dtype | rows | DynamicCache | StaticCache | StaticCache + compile | compile ratio | "
        "compile time |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:

        def cell(ms: float) -> str:
            return f"{ms:.1f} ({1000 / ms:.1f})"

        lines.append(
            f"| {r['dtype']} | {r['rows']} | {cell(r['dynamic'])} | {cell(r['static'])} | "
            f"{cell(r['static+compile'])} | ×{r['dynamic'] / r['static+compile']:.2f} | "
            f"{r['compile_s']:.0f} s |"
        )
    common.publish(results, args.out, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
