"""A run's trace spans, below its Run RPC span: one per round's generation
(current while it decodes, so the worker's Generate span is its child), and
one per tool call and per unit, opened and closed by the run's own events.
A unit dispatched while the model decodes has a span that overlaps its
round's: the partial-execution overlap, visible in any trace viewer.

Nothing here changes what a run does; with tracing off these are no-op spans.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from opentelemetry import context as otel_context
from opentelemetry import trace

from conveyor_common import tracing
from scheduler.events import (
    CallOutcome,
    ClientToolCall,
    ParseError,
    RunEvent,
    RunFinished,
    ToolCallStarted,
    UnitDispatched,
    UnitResult,
)

SERVICE = "scheduler"


class RunSpans:
    def __init__(self, run_id: str, partial: bool):
        self._run_id = run_id
        self._mode = "partial" if partial else "sequential"
        # Captured at the run's start: the Run RPC's server span.
        self._run_context = otel_context.get_current()
        self._round_context: otel_context.Context | None = None
        self._calls: dict[str, trace.Span] = {}
        self._units: dict[tuple[str, int], trace.Span] = {}
        trace.get_current_span().set_attributes(
            {"conveyor.run_id": run_id, "conveyor.mode": self._mode}
        )

    def _start(self, name: str, parent, **attributes) -> trace.Span:
        return tracing.tracer().start_span(
            name,
            context=parent,
            attributes={
                tracing.SERVICE_ATTRIBUTE: SERVICE,
                "conveyor.run_id": self._run_id,
                **attributes,
            },
        )

    @contextlib.contextmanager
    def round(self, round_no: int) -> Iterator[trace.Span]:
        """The round's generation span, current for the block."""
        span = self._start(
            f"generate round {round_no}", self._run_context, **{"conveyor.round": round_no}
        )
        self._round_context = trace.set_span_in_context(span, self._run_context)
        try:
            with trace.use_span(span, end_on_exit=True):
                yield span
        finally:
            self._round_context = None  # calls opened after it hang from the run

    def on_event(self, event: RunEvent) -> None:
        if isinstance(event, ToolCallStarted):
            self._calls[event.call_id] = self._start(
                f"tool_call {event.tool_name}",
                self._round_context or self._run_context,
                **{
                    "conveyor.call_id": event.call_id,
                    "conveyor.tool": event.tool_name,
                    "conveyor.round": event.round,
                    "conveyor.partial_mode": event.partial_mode.name,
                },
            )
        elif isinstance(event, UnitDispatched):
            call = self._calls.get(event.call_id)
            parent = trace.set_span_in_context(call) if call else self._run_context
            self._units[(event.call_id, event.index)] = self._start(
                f"unit {event.index}",
                parent,
                **{
                    "conveyor.call_id": event.call_id,
                    "conveyor.unit": event.index,
                    "conveyor.during_decode": event.during_decode,
                    "conveyor.unit_chars": len(event.text),
                },
            )
        elif isinstance(event, UnitResult):
            span = self._units.pop((event.call_id, event.index), None)
            if span is not None:
                span.set_attributes(
                    {"conveyor.ok": event.ok, "conveyor.tool_seconds": event.duration_seconds}
                )
                span.end()
        elif isinstance(event, CallOutcome | ParseError | ClientToolCall):
            self._end_call(event.call_id, event)
        elif isinstance(event, RunFinished):
            trace.get_current_span(self._run_context).set_attribute(
                "conveyor.finish_reason", event.finish_reason.value
            )
            self.close("")

    def close(self, reason: str) -> None:
        """Ends every span still open (the run ended, or the client left:
        `reason` then marks them as errors)."""
        for span in [*self._units.values(), *self._calls.values()]:
            if reason:
                span.set_status(trace.StatusCode.ERROR, reason)
            span.end()
        self._units.clear()
        self._calls.clear()

    def _end_call(self, call_id: str, event: RunEvent | None) -> None:
        for key in [k for k in self._units if k[0] == call_id]:
            self._units.pop(key).end()
        span = self._calls.pop(call_id, None)
        if span is None:
            return
        if isinstance(event, CallOutcome):
            span.set_attribute("conveyor.ok", event.ok)
            if not event.ok:
                span.set_status(trace.StatusCode.ERROR, event.error_message[:200])
        elif isinstance(event, ParseError):
            span.set_status(trace.StatusCode.ERROR, event.message[:200])
        span.end()
