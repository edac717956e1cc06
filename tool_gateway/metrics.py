"""Prometheus metrics of the gateway (served on --metrics-port)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

UNITS = Counter(
    "conveyor_gateway_units",
    "Command units run, by tool and by whether the unit's code succeeded.",
    ["tool", "result"],
)
TOOL_SECONDS = Counter(
    "conveyor_gateway_tool_seconds",
    "Seconds tools spent running units, summed.",
    ["tool"],
)
CALLS = Counter(
    "conveyor_gateway_calls",
    "Tool calls ended, by tool and outcome (ok, failed, or a ToolErrorCode name).",
    ["tool", "outcome"],
)
SESSIONS = Gauge("conveyor_gateway_sessions", "Live tool sessions (processes).", ["tool"])
