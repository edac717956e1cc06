"""One run: rounds of model output, each round's tool calls run, their
results fed back to the model, events out in order.

This file is the loop over rounds and the run's life (deadline, cancel, the
end counted once). One generation pass is scheduler/generation.py; the table
of calls and the gateway stream, where PARTIAL and SEQUENTIAL mode differ in
one line, is scheduler/calls.py; plans run in scheduler/plans.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field

import structlog

from conveyor_common.types import Envelope, FinishReason, Message, Sampling
from scheduler import metrics
from scheduler.calls import Call, CallTable
from scheduler.events import (
    AbortVerdict,
    CallOutcome,
    ParseError,
    RoundStarted,
    RunEvent,
    RunFinished,
)
from scheduler.gateway_client import GatewayClient
from scheduler.generation import Generation
from scheduler.plans import PlanRunner
from scheduler.run_spans import RunSpans
from scheduler.timing import TimingRecorder
from scheduler.tools import ToolInfo
from scheduler.worker_client import WorkerClient, WorkerDone, WorkerRejected

log = structlog.get_logger("run")


@dataclass(frozen=True)
class RunSpec:
    run_id: str
    messages: list[Message]
    tools: dict[str, ToolInfo]  # the tools this run may call
    partial: bool = True
    sampling: Sampling = field(default_factory=Sampling)
    max_rounds: int = 4
    abort_retries: int = 0  # re-prompts with an abort verdict before the run ends ABORTED
    forced_completions: tuple[str, ...] = ()
    envelopes: frozenset[Envelope] = frozenset({Envelope.FENCE, Envelope.TAG})
    timeout: float = 600.0


class Run:
    def __init__(self, spec: RunSpec, worker: WorkerClient, gateway: GatewayClient):
        self.spec = spec
        self.timing = TimingRecorder()
        self.spans = RunSpans(spec.run_id, spec.partial)
        self._worker = worker
        self._queue: asyncio.Queue[RunEvent] = asyncio.Queue()
        self._tasks: set[asyncio.Task] = set()  # plan steps in flight
        self._generation: Generation | None = None  # the round being decoded
        self._counted = False  # the run's end is in the metrics and the log
        # Every downstream call gets what is left of the run's own deadline.
        self._deadline = time.monotonic() + spec.timeout
        self._table = CallTable(
            run_id=spec.run_id,
            tools=spec.tools,
            partial=spec.partial,
            gateway=gateway,
            emit=self.emit,
            timing=self.timing,
            remaining=self.remaining,
            on_verdict=self._stop_decoding,
        )
        self._table.plans = PlanRunner(self._table, self.emit, self._spawn)

    # ---- public ----------------------------------------------------------

    async def events(self) -> AsyncIterator[RunEvent]:
        """Yields every event once, in order; RunFinished last. Leaving early
        (client cancel) stops decoding and kills the run's tools."""
        main = asyncio.create_task(self._main())
        finished = False
        try:
            while True:
                event = await self._queue.get()
                finished = isinstance(event, RunFinished)
                yield event
                if finished:
                    return
        finally:
            if not finished:  # the client left: its run ends here, and is counted
                self._ended(FinishReason.CANCELLED, "the client cancelled the run")
                self.spans.close("the client cancelled the run")
            main.cancel()
            for task in self._tasks:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await main
            self._table.cancel_stream()

    def remaining(self) -> float:
        return max(0.001, self._deadline - time.monotonic())

    def emit(self, event: RunEvent) -> None:
        self.spans.on_event(event)
        self._queue.put_nowait(event)

    # ---- the run ---------------------------------------------------------

    def _spawn(self, coro: Coroutine) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _stop_decoding(self) -> None:
        """An abort verdict came: the worker stops the round's generation."""
        if self._generation is not None:
            await self._worker.abort(self._generation.id)

    async def _main(self) -> None:
        reason, message, final_text, rejected = FinishReason.ERROR, "", "", False
        try:
            async with asyncio.timeout(self.spec.timeout):
                reason, message, final_text = await self._rounds()
        except TimeoutError:
            reason, message = FinishReason.DEADLINE_EXCEEDED, "the run's deadline passed"
        except WorkerRejected as e:  # the request itself is bad; before any output, say so
            reason, message, rejected = FinishReason.ERROR, str(e), self._nothing_out()
        except Exception as e:  # a failed service ends the run with a clear reason
            log.warning("run failed", error=str(e))
            reason, message = FinishReason.ERROR, str(e)
        if reason in (
            FinishReason.STOP,
            FinishReason.MAX_ROUNDS,
            FinishReason.FORCED_END,
            FinishReason.TOOL_CALLS,
        ):
            await self._table.finish_stream(wait=5.0)
        else:
            self._table.cancel_stream()
        timing = self._ended(reason, message)
        self.emit(RunFinished(reason, message, final_text, timing, rejected=rejected))

    def _ended(self, reason: FinishReason, message: str):
        """Counts and logs the run's end, once, whatever ended it."""
        timing = self.timing.summary()
        if self._counted:
            return timing
        self._counted = True
        mode = "partial" if self.spec.partial else "sequential"
        metrics.RUNS.labels(mode, reason.value).inc()
        metrics.RUN_SECONDS.labels(mode).observe(timing.total_seconds)
        metrics.HIDDEN_TOOL_SECONDS.inc(timing.hidden_tool_seconds)
        metrics.TOOL_SECONDS.inc(timing.tool_seconds)
        if reason is FinishReason.ABORTED:
            metrics.ABORTS.inc()
        log.info(
            "run done",
            finish=reason.value,
            message=message[:200],
            total_s=round(timing.total_seconds, 3),
            hidden_s=round(timing.hidden_tool_seconds, 3),
            units=timing.units_dispatched,
        )
        return timing

    async def _rounds(self) -> tuple[FinishReason, str, str]:
        messages = list(self.spec.messages)
        text = ""
        retries = self.spec.abort_retries
        table = self._table
        for round_no in range(self.spec.max_rounds):
            self.emit(RoundStarted(round_no))
            text, done = await self._generate(round_no, messages)
            if table.abort is not None:
                verdict = table.abort
                table.cancel_round(round_no, "the run was aborted")
                if retries <= 0:
                    return FinishReason.ABORTED, verdict.reason, text
                # Re-prompt: the model reads what it wrote and why it was stopped.
                retries -= 1
                table.abort = None
                messages.append(Message("assistant", text))
                messages.append(_verdict_message(table.calls[verdict.call_id], verdict))
                continue
            calls = [c for c in table.calls.values() if c.round == round_no and c.read_back]
            if any(c.tool is not None and c.tool.client and not c.failed for c in calls):
                # The client runs these and continues the conversation itself;
                # the round's hosted calls still finish (their events go out).
                return FinishReason.TOOL_CALLS, "", text
            if not calls:
                return done.finish_reason, "", text
            outcomes = [await call.outcome for call in calls]
            messages.append(Message("assistant", text))
            for call, outcome in zip(calls, outcomes, strict=True):
                messages.append(_tool_message(call, outcome))
        return (
            FinishReason.MAX_ROUNDS,
            f"the model still called tools after {self.spec.max_rounds} rounds",
            text,
        )

    async def _generate(self, round_no: int, messages: list[Message]) -> tuple[str, WorkerDone]:
        self._generation = Generation(self, round_no, self._worker, self._table)
        return await self._generation.run(messages)

    def _nothing_out(self) -> bool:
        """No model output has gone to the client yet. Only round 0 can be
        without it: a round that writes nothing calls no tool, so the run ends."""
        g = self._generation
        return g is None or (g.round == 0 and not g.output_started)


def _verdict_message(call: Call, verdict: AbortVerdict) -> Message:
    where = f" (argument {verdict.field!r})" if verdict.field else ""
    content = f"aborted{where}: {verdict.reason}. Correct the call and try again."
    name = call.tool.name if call.tool else ""
    return Message("tool", content, name=name, tool_call_id=call.call_id)


def _tool_message(call: Call, outcome: CallOutcome | ParseError) -> Message:
    name = call.tool.name if call.tool else ""
    if isinstance(outcome, ParseError):
        content = f"error: {outcome.message}"
    elif outcome.error_code:
        content = f"error ({outcome.error_code}): {outcome.error_message}"
    else:
        content = outcome.output
    return Message("tool", content, name=name, tool_call_id=call.call_id)
