"""Prometheus metrics of the scheduler (served on --metrics-port): what
partial execution saves, and what it costs."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

RUNS = Counter(
    "conveyor_scheduler_runs", "Runs ended, by mode and finish reason.", ["mode", "reason"]
)
RUN_SECONDS = Histogram(
    "conveyor_scheduler_run_seconds",
    "Run latency from request to RunFinished, by mode.",
    ["mode"],
    buckets=(0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 300),
)
UNITS_DISPATCHED = Counter(
    "conveyor_scheduler_units_dispatched",
    "Command units sent to tools, by whether decoding was still going on.",
    ["during_decode"],
)
HIDDEN_TOOL_SECONDS = Counter(
    "conveyor_scheduler_hidden_tool_seconds",
    "Tool seconds that ran while the model was still decoding (the saving).",
)
TOOL_SECONDS = Counter("conveyor_scheduler_tool_seconds", "Tool seconds, hidden or not.")
PARSE_LAG = Histogram(
    "conveyor_scheduler_parse_lag_seconds",
    "From a unit's last delta arriving to the unit being sent to its tool.",
    buckets=(1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1, 3),
)
ABORTS = Counter("conveyor_scheduler_aborts", "Runs a tool's abort verdict stopped.")
