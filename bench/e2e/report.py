"""The end-to-end results as a markdown table, and a chart in the spirit of
the paper's Figure 6 (mean latency per workload, both modes, and the bound)."""

from __future__ import annotations

from pathlib import Path

from bench import common

PAPER_BEST_PCT = 38.8  # the paper's largest reduction without early abort
GOAL_SHARE_PCT = 90.0


def _pct(v: float | None) -> str:
    return "" if v is None else f"{v:.1f} %"


def markdown(results: dict) -> str:
    m, cfg = results["machine"], results["config"]
    cpu = common.cpu_name(m)
    out = [
        "# Conveyor end to end: partial vs sequential execution",
        "",
        f"Machine: {cpu}, {m['cpu_count']} CPUs. Worker engine: "
        f"{results['config'].get('engine', 'hf')}. Date: {results['date']}. "
        f"Model: {cfg['model']}. {cfg['requests_per_workload']} request(s) per workload, "
        "each run in both modes, alternating which goes first, through the three services "
        "as separate processes. Search: a loopback HTTP service over the docs index, "
        f"latency {cfg['search_latency']}.",
        "",
        "| workload | requests | sequential mean | sequential p90 | partial mean | partial p90 "
        "| reduction | ideal bound | ideal reduction | share of ideal | same results |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for w in results["workloads"]:
        out.append(
            f"| {w['workload']} | {w['requests']} | {w['sequential_mean_s']:.2f} s | "
            f"{w['sequential_p90_s']:.2f} s | {w['partial_mean_s']:.2f} s | "
            f"{w['partial_p90_s']:.2f} s | {_pct(w['reduction_pct'])} | "
            f"{w['ideal_mean_s']:.2f} s | {_pct(w['ideal_reduction_pct'])} | "
            f"{_pct(w['share_of_ideal_pct'])} | {'yes' if w['same_results'] else 'NO'} |"
        )
    aborted = [w for w in results["workloads"] if w["aborted"]]
    for w in aborted:
        out += [
            "",
            f"{w['workload']}: {w['aborted']} request(s) carry an invalid argument; partial "
            f"execution decoded {_pct(w['abort_tokens_saved_pct'])} fewer tokens on them "
            "than sequential (the verdict stops decoding).",
        ]
    o = results.get("overheads") or {}
    if o:
        out += ["", "## Overheads", ""]
        if o.get("parsers"):
            cells = ", ".join(f"{p['mode']} {p['median_us']:.2f} µs" for p in o["parsers"])
            out.append(f"- parser cost per delta (median, 4 KB inputs): {cells}")
        hop = o.get("hop")
        if hop:
            out.append(
                f"- scheduler hop: time to first token +{hop['ttft_added_ms']:.1f} ms over the "
                f"worker's own {hop['ttft_direct_ms']:.0f} ms; last of {hop['deltas']} deltas "
                f"+{hop['last_delta_added_ms']:.1f} ms ({hop['pairs']} pairs)"
            )
        if o.get("parse_lag_ms") is not None:
            out.append(
                f"- unit complete in the token stream → dispatched: {o['parse_lag_ms']:.3f} ms "
                "(mean, inside the scheduler)"
            )
        d = o.get("dispatch_to_start_ms")
        if d:
            out.append(
                f"- dispatched → tool started (client view, return trip included): median "
                f"{d['median']:.1f} ms, p90 {d['p90']:.1f} ms over {d['units']} units"
            )
        wk = o.get("worker")
        if wk:
            rows = ", ".join(
                f"{r['streams']} stream(s) {r['aggregate_tokens_per_s']:.1f} tok/s"
                for r in wk["rows"]
            )
            out.append(
                f"- worker decode: {rows}; plain generate() {wk['generate_tokens_per_s']:.1f} tok/s"
            )
    out += ["", "## Goals", ""]
    for w in results["workloads"]:
        share, noise = w["share_of_ideal_pct"], w.get("paired_noise_s")
        if share is not None and noise and w["possible_saving_s"] < 2 * noise:
            out.append(
                f"- {w['workload']}: the possible saving, {w['possible_saving_s']:.2f} s, is "
                f"within the noise of the paired runs (2 standard errors: {2 * noise:.2f} s); "
                f"{_pct(share)} of it is not a measurement"
            )
        elif share is not None:
            met = share >= GOAL_SHARE_PCT
            out.append(
                f"- {w['workload']}: {_pct(share)} of the ideal saving "
                f"(goal ≥ {GOAL_SHARE_PCT:g} %) — {'met' if met else 'MISSED'}"
            )
        else:
            spread = f"; 2 standard errors of the paired runs: {2 * noise:.2f} s" if noise else ""
            out.append(
                f"- {w['workload']}: no saving to share (ideal reduction "
                f"{_pct(w['ideal_reduction_pct'])}{spread}): the tools are far lighter "
                "than decoding"
            )
    return "\n".join(out) + "\n"


def chart(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["workloads"]
    names = [w["workload"] for w in rows]
    x = range(len(names))
    width = 0.27
    fig, ax = plt.subplots(figsize=(9, 4.5))
    seq = [w["sequential_mean_s"] for w in rows]
    par = [w["partial_mean_s"] for w in rows]
    ideal = [w["ideal_mean_s"] for w in rows]
    ax.bar([i - width for i in x], seq, width, label="sequential", color="#9e9e9e")
    bars = ax.bar(list(x), par, width, label="partial (Conveyor)", color="#1f77b4")
    ax.bar([i + width for i in x], ideal, width, label="ideal bound", color="#aec7e8")
    for bar, w in zip(bars, rows, strict=True):
        ax.annotate(
            f"{-w['reduction_pct']:+.0f}%",  # -25% is 25 % faster than sequential
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_xticks(list(x), names)
    ax.set_ylabel("mean request latency (s)")
    ax.set_title("Request completion latency, sequential vs partial tool execution")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
