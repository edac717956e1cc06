"""The results as a markdown table and a JSON document, with the goals."""

from __future__ import annotations

MEDIAN_GOAL_US = 5.0
MEDIAN_GOAL_KEYS = ("PYTHON_STATEMENTS", "JSON_FIELDS", "JSON_FIELDS:code")
FLAT_GOAL_RATIO = 1.5  # largest-size median / smallest-size median that still reads as flat

BASELINE_TITLES = {"partial_json_parser": "partial-json-parser", "jiter": "jiter"}


def goals(rows: list[dict]) -> dict:
    by_key: dict[str, list[dict]] = {}
    for row in rows:
        by_key.setdefault(row["key"], []).append(row)
    median = []
    formats = sorted(k for k in by_key if k.startswith("FORMAT:"))  # every tool-call format
    for key in (*MEDIAN_GOAL_KEYS, *formats):
        if key not in by_key:
            continue
        worst = max(by_key[key], key=lambda r: r["ours"]["median_us"])
        median.append(
            {
                "key": key,
                "worst_median_us": worst["ours"]["median_us"],
                "at_kb": worst["size_kb"],
                "goal_us": MEDIAN_GOAL_US,
                "met": worst["ours"]["median_us"] <= MEDIAN_GOAL_US,
            }
        )
    flat = []
    for key, key_rows in by_key.items():
        small = min(key_rows, key=lambda r: r["size_kb"])
        large = max(key_rows, key=lambda r: r["size_kb"])
        if small is large:
            continue
        ratio = large["ours"]["median_us"] / small["ours"]["median_us"]
        flat.append(
            {
                "key": key,
                "from_kb": small["size_kb"],
                "to_kb": large["size_kb"],
                "median_ratio": ratio,
                "mean_ratio": large["ours"]["mean_us"] / small["ours"]["mean_us"],
                "goal_ratio": FLAT_GOAL_RATIO,
                "met": ratio <= FLAT_GOAL_RATIO,
            }
        )
    return {"median_at_most_us": median, "flat_per_delta": flat}


def _us(v: float) -> str:
    return f"{v:.2f}" if v < 100 else f"{v:.0f}"


def _x(v: float) -> str:
    return f"{v:.1f}×" if v < 100 else f"{v:.0f}×"


def markdown(results: dict) -> str:
    m, cfg = results["machine"], results["config"]
    cpu = m["processor"] or m["cpu_model"] or m["machine"]
    names = list(BASELINE_TITLES)
    out = [
        "# Conveyor parser cost per delta",
        "",
        f"Machine: {cpu} ({m['machine']}), {m['cpu_count']} CPUs, "
        f"{m['implementation']} {m['python']}, {m['platform']}. Date: {results['date']}.",
        "",
        f"Deltas: one token's text each, cut with the tokenizer of {cfg['tokenizer']}. "
        f"Ours: at least {cfg['reps']} passes (and {cfg['min_samples']} timed deltas) "
        "with time.perf_counter_ns around every feed() (median and p99 over all of "
        "them); mean = total time of an untimed pass "
        "(every feed and finish) / deltas. Baselines re-parse the whole prefix "
        f"at every delta ({cfg['baseline_reps']} pass(es)); "
        f"(s): inputs of {cfg['sample_from_kb']} KB and more time an evenly spaced "
        f"sample of {cfg['sample']} deltas, and their median is the sample's. "
        "A baseline only parses the JSON prefix: with a `code` field it would still "
        "have to split the decoded code into statements, which ours includes.",
        "",
        "| mode | input | size | deltas | units | median µs/delta | p99 µs/delta "
        "| mean µs/delta | "
        + " | ".join(f"{BASELINE_TITLES[n]} median µs" for n in names)
        + " | "
        + " | ".join(f"{BASELINE_TITLES[n]} / ours" for n in names)
        + " |",
        "|" + "---|" * (8 + 2 * len(names)),
    ]
    for r in results["rows"]:
        o = r["ours"]
        mode = r["mode"] + (f" ({r['command_field']})" if r["command_field"] else "")
        cells = [
            mode,
            r["input"],
            f"{r['size_kb']} KB",
            str(r["deltas"]),
            str(r["units"]),
            _us(o["median_us"]),
            _us(o["p99_us"]),
            _us(o["mean_us"]),
        ]
        base = r["baselines"]
        for n in names:
            b = base.get(n)
            cells.append(f"{_us(b['median_us'])}{' (s)' if b['sampled'] else ''}" if b else "")
        for n in names:
            cells.append(_x(r["ratio"][n]) if n in r["ratio"] else "")
        out.append("| " + " | ".join(cells) + " |")

    g = results["goals"]
    out += ["", "## Goals", ""]
    for item in g["median_at_most_us"]:
        out.append(
            f"- median ≤ {item['goal_us']:g} µs/delta, {item['key']}: worst "
            f"{_us(item['worst_median_us'])} µs at {item['at_kb']} KB — "
            f"{'met' if item['met'] else 'MISSED'}"
        )
    for item in g["flat_per_delta"]:
        out.append(
            f"- flat per-delta cost, {item['key']}: median {item['to_kb']} KB / "
            f"{item['from_kb']} KB = {item['median_ratio']:.2f} (mean "
            f"{item['mean_ratio']:.2f}; flat ≤ {item['goal_ratio']:g}) — "
            f"{'met' if item['met'] else 'MISSED'}"
        )
    if not g["median_at_most_us"] and not g["flat_per_delta"]:
        out.append("- (no measured mode has a goal at these sizes)")
    if results["skipped"]:
        out += ["", "## Skipped", ""]
        out += [f"- {s['key']}: {s['reason']}" for s in results["skipped"]]
    return "\n".join(out) + "\n"
