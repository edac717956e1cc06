"""Prometheus metrics of the worker (served on --metrics-port), named after
vLLM's so existing dashboards read them."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
_TTFT_BUCKETS = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 60.0)

TIME_TO_FIRST_TOKEN = Histogram(
    "conveyor_worker_time_to_first_token_seconds",
    "Seconds from a request's arrival to its first generated token.",
    buckets=_TTFT_BUCKETS,
)
INTER_TOKEN_LATENCY = Histogram(
    "conveyor_worker_inter_token_latency_seconds",
    "Seconds between two consecutive generated tokens of one request.",
    buckets=_LATENCY_BUCKETS,
)
QUEUE_TIME = Histogram(
    "conveyor_worker_queue_time_seconds",
    "Seconds a request waited for a batch slot before its prefill.",
    buckets=_TTFT_BUCKETS,
)
RUNNING = Gauge("conveyor_worker_num_requests_running", "Requests in the decode batch.")
WAITING = Gauge("conveyor_worker_num_requests_waiting", "Requests waiting for a batch slot.")
BATCH_SIZE = Histogram(
    "conveyor_worker_batch_size",
    "Rows in each decode step.",
    buckets=(1, 2, 4, 8, 12, 16, 24, 32, 48, 64),
)
GENERATED_TOKENS = Counter("conveyor_worker_generation_tokens", "Tokens generated.")
PROMPT_TOKENS = Counter("conveyor_worker_prompt_tokens", "Prompt tokens, cached ones included.")
CACHED_PROMPT_TOKENS = Counter(
    "conveyor_worker_cached_prompt_tokens", "Prompt tokens served from the prefix cache."
)
PREFILL_SECONDS_SAVED = Counter(
    "conveyor_worker_prefill_seconds_saved",
    "Estimated prefill seconds the prefix cache saved.",
)
FINISHED = Counter("conveyor_worker_requests_finished", "Requests ended, by reason.", ["reason"])
