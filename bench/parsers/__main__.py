"""Parser cost per delta, for every partial mode, against re-parsing the prefix.

    python -m bench.parsers [--sizes 1,4,16,64] [--quick] [--out bench/results/parsers]

Writes <out>.md (also printed) and <out>.json. See bench/parsers/report.py
for the goals and WORKLOADS.md ("Overheads we measure") for why.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import TextIO

from bench import common
from bench.parsers import inputs, measure, report

FULL_SIZES = (1, 4, 16, 64)
QUICK_SIZES = (1, 4)
JSON_MODES = ("JSON_FIELDS",)


def parser_factory(mode: str, command_field: str) -> tuple[Callable[[], object] | None, str]:
    """A zero-argument parser maker for the mode, or None and why not."""
    try:
        from scheduler.parsers import parser_for
    except Exception as e:  # the package itself is broken or half-written
        return None, f"scheduler.parsers cannot be imported ({type(e).__name__}: {e})"
    if mode == inputs.FORMAT_MODE:  # a tool-call format, named by command_field
        from bench.parsers.formats import FormatPipeline

        return (lambda: FormatPipeline(command_field)), ""

    def make():
        return parser_for(mode, command_field=command_field) if command_field else parser_for(mode)

    try:
        parser = make()
    except TypeError as e:
        return None, f"parser_for does not take command_field yet ({e})"
    except Exception as e:
        return None, f"parser_for({mode!r}) failed ({type(e).__name__}: {e})"
    if mode != "WHOLE" and type(parser).__name__ == "WholeParser":
        return None, f"parser_for({mode!r}) falls back to WholeParser: not implemented yet"
    return make, ""


def run(
    sizes: Sequence[int],
    quick: bool = False,
    keys: Sequence[str] | None = None,
    tokenizer=None,
    sample: int = 300,
    sample_from_kb: int = 64,
    progress: TextIO = sys.stderr,
) -> dict:
    """Measures every available mode at every size; returns all the numbers."""
    say = common.progress("bench.parsers", progress)

    reps = 2 if quick else 5
    min_samples = 1_000 if quick else 20_000  # per-delta timings per row, at least
    baseline_reps = 1 if quick else 3
    every = inputs.all_specs()
    specs = [s for s in every if keys is None or s[0] in keys]
    if keys is not None:
        unknown = set(keys) - {s[0] for s in every}
        if unknown:
            raise ValueError(f"unknown modes {sorted(unknown)}; known: {[s[0] for s in every]}")

    factories: dict[str, Callable[[], object]] = {}
    skipped: list[dict] = []
    for key, mode, command_field, _, _ in specs:
        make, why = parser_factory(mode, command_field)
        if make is None:
            skipped.append(
                {"key": key, "mode": mode, "command_field": command_field, "reason": why}
            )
            print(f"note: skipping {key}: {why}")
        else:
            factories[key] = make

    if tokenizer is None:
        say("loading the default model's tokenizer")
        tokenizer, tokenizer_label = measure.load_tokenizer()
    else:
        tokenizer_label = str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)

    rows: list[dict] = []
    todo = [spec for spec in specs if spec[0] in factories]
    for step, (key, mode, command_field, label, _) in enumerate(todo, 1):
        make = factories[key]
        where = f"[{step}/{len(todo)}] {key}"
        texts = [inputs.build(key, size_kb).text for size_kb in sizes]
        delta_sets = [measure.token_deltas(text, tokenizer) for text in texts]
        try:
            units = [measure.check_parser(make, deltas) for deltas in delta_sets]
        except Exception as e:
            reason = f"the parser rejected the input ({type(e).__name__}: {e})"
            skipped.append(
                {"key": key, "mode": mode, "command_field": command_field, "reason": reason}
            )
            print(f"note: skipping {key}: {reason}")
            continue
        for size_kb, n in zip(sizes, units, strict=True):
            if mode != "WHOLE" and n <= 1:
                print(f"note: {key} {size_kb} KB gave {n} unit(s) for a multi-unit input")
        say(f"{where}: timing {', '.join(f'{s} KB' for s in sizes)} side by side")
        runs = measure.time_parsers(make, delta_sets, reps, min_samples)
        for size_kb, text, deltas, n_units, ours in zip(
            sizes, texts, delta_sets, units, runs, strict=True
        ):
            say(
                f"{where} {size_kb} KB: {len(deltas)} deltas, {n_units} units, "
                f"ours median {ours.timing.median_us:.2f} µs"
            )
            baselines: dict[str, measure.Timing] = {}
            if mode in JSON_MODES:
                n_sample = sample if size_kb >= sample_from_kb else None
                for name in measure.BASELINES:
                    baselines[name] = measure.time_baseline(
                        name, text, deltas, n_sample, reps=baseline_reps
                    )
                    say(
                        f"{where} {size_kb} KB: {name} median "
                        f"{baselines[name].median_us:.1f} µs"
                        + (" (sampled)" if baselines[name].sampled else "")
                    )
            rows.append(
                {
                    "key": key,
                    "mode": mode,
                    "command_field": command_field,
                    "input": label,
                    "size_kb": size_kb,
                    "bytes": inputs.nbytes(text),
                    "chars": len(text),
                    "deltas": len(deltas),
                    "units": n_units,
                    "passes": ours.timing.samples // len(deltas),
                    "ours": ours.timing.as_dict()
                    | {
                        "pass_totals_ms": ours.totals_ms,
                        "mean_ns_per_char": ours.timing.mean_us * 1000 * len(deltas) / len(text),
                    },
                    "baselines": {n: b.as_dict() for n, b in baselines.items()},
                    "ratio": {n: b.median_us / ours.timing.median_us for n, b in baselines.items()},
                }
            )
    say("done")
    return {
        "benchmark": "parsers",
        "date": common.now(),
        "machine": common.machine(),
        "config": {
            "sizes_kb": list(sizes),
            "quick": quick,
            "reps": reps,
            "min_samples": min_samples,
            "baseline_reps": baseline_reps,
            "sample": sample,
            "sample_from_kb": sample_from_kb,
            "tokenizer": tokenizer_label,
            "units": "µs per delta",
        },
        "rows": rows,
        "skipped": skipped,
        "goals": report.goals(rows),
    }


def main(argv: Sequence[str] | None = None, tokenizer=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.parsers", description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", help="input sizes in KB, comma-separated (default 1,4,16,64)")
    ap.add_argument("--quick", action="store_true", help="1 and 4 KB, fewer repetitions (CI)")
    ap.add_argument("--out", default="bench/results/parsers", help="writes <out>.md and <out>.json")
    ap.add_argument(
        "--modes", help="only these, comma-separated (e.g. PYTHON_STATEMENTS,JSON_FIELDS:code)"
    )
    ap.add_argument("--sample", type=int, default=300, help="deltas timed for sampled baselines")
    ap.add_argument(
        "--sample-from-kb", type=int, default=64, help="sample the baselines from this size up"
    )
    args = ap.parse_args(argv)
    if args.sizes:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    else:
        sizes = list(QUICK_SIZES if args.quick else FULL_SIZES)
    keys = [k.strip() for k in args.modes.split(",")] if args.modes else None
    results = run(
        sizes,
        quick=args.quick,
        keys=keys,
        tokenizer=tokenizer,
        sample=args.sample,
        sample_from_kb=args.sample_from_kb,
    )
    common.publish(results, args.out, report.markdown(results))
    return 0 if results["rows"] else 1


if __name__ == "__main__":
    sys.exit(main())
