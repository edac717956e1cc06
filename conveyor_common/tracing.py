"""OpenTelemetry traces, opt-in (`--otlp-endpoint`, or the standard
OTEL_EXPORTER_OTLP_ENDPOINT): one trace per run across the three services.

Every RPC gets a server span (RequestContextInterceptor) whose parent comes
from the caller's `traceparent` metadata; the scheduler's clients inject the
current span into theirs (clients.outgoing_metadata). Within that, the
scheduler opens a span per round's generation and per tool call and unit
(scheduler/run_spans.py), the gateway one per call and unit it runs.

Without an endpoint the tracer is OpenTelemetry's no-op one: spans cost a
few microseconds and nothing is sent. Tests install a provider of their own
with `use_provider` (an in-memory exporter) and remove it after.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from opentelemetry import propagate, trace
from opentelemetry.context import Context

# Which service made a span: the resource says so in a real deployment (one
# process per service); this attribute also says it when tests run all three
# in one process under one provider.
SERVICE_ATTRIBUTE = "conveyor.service"
OTLP_ENV = "OTEL_EXPORTER_OTLP_ENDPOINT"

_provider: trace.TracerProvider | None = None


def use_provider(provider: trace.TracerProvider | None) -> None:
    """The provider Conveyor's spans go to (None: the global one, a no-op
    unless configured)."""
    global _provider
    _provider = provider


def tracer() -> trace.Tracer:
    provider = _provider or trace.get_tracer_provider()
    return provider.get_tracer("conveyor")


def configure(service: str, endpoint: str) -> None:
    """Exports this process's spans over OTLP/gRPC to `endpoint` (e.g.
    http://otel-collector:4317; https:// for TLS), in batches off the event
    loop. An empty endpoint leaves tracing off."""
    if not endpoint:
        return
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(
        BatchSpanProcessor(
            OTLPSpanExporter(endpoint=endpoint, insecure=endpoint.startswith("http://"))
        )
    )
    trace.set_tracer_provider(provider)
    use_provider(provider)


def shutdown() -> None:
    """Sends what is still batched (on SIGTERM, after the server stopped)."""
    if _provider is not None and hasattr(_provider, "shutdown"):
        _provider.shutdown()


def default_endpoint() -> str:
    return os.environ.get(OTLP_ENV, "")


def inject() -> tuple[tuple[str, str], ...]:
    """The current span as W3C trace-context metadata (empty without one)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return tuple(carrier.items())


def extract(metadata: Iterable[tuple[str, str | bytes]] | None) -> Context:
    """The caller's span context from its metadata."""
    carrier = {k: v for k, v in metadata or () if isinstance(v, str)}
    return propagate.extract(carrier)
