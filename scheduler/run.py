"""One run: rounds of model output, tool calls found in it, units sent to
the gateway as they complete, results fed back, events out in order.

PARTIAL and SEQUENTIAL mode share every line of this file but one: whether a
completed unit is sent now or held until its call is complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import structlog

from conveyor_common.types import Envelope, FinishReason, Message, Sampling
from scheduler import metrics
from scheduler.envelopes import (
    CallBody,
    CallClosed,
    CallOpened,
    CallText,
    EnvelopeScanner,
    ScanContext,
    formats_named,
)
from scheduler.events import (
    AbortVerdict,
    CallOutcome,
    ParseError,
    RoundStarted,
    RunEvent,
    RunFinished,
    TokenDelta,
    ToolCallStarted,
    UnitDispatched,
    UnitProgress,
    UnitResult,
)
from scheduler.gateway_client import ExecuteStream, GatewayClient, GatewayEvent
from scheduler.parsers import (
    ParsedUnit,
    ParseFailure,
    ToolCallTagParser,
    UnitParser,
    arguments_parser_for,
    check_unit,
    parser_for,
)
from scheduler.plans import JOIN, PLAN_TOOL, PlanScanner, arguments_for, bind
from scheduler.plans import summary as plan_summary
from scheduler.timing import TimingRecorder
from scheduler.tools import ToolInfo, fence_tools
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


@dataclass
class _Call:
    call_id: str
    round: int
    envelope: str
    tool: ToolInfo | None = None  # None until a tag call's JSON names it
    parser: UnitParser | None = None
    text: list[str] = field(default_factory=list)
    held: list[tuple[ParsedUnit, float]] = field(default_factory=list)  # (unit, completed at)
    units_sent: int = 0
    outcome: asyncio.Future | None = None  # CallOutcome | ParseError
    failed: bool = False  # its text could not be parsed
    step_of: str = ""  # a plan step's call: the plan call's id
    # A plan call: each step's (ok, output), as the step ends, and its call text.
    steps: dict[int, asyncio.Future] = field(default_factory=dict)
    step_texts: dict[int, str] = field(default_factory=dict)
    tool_steps: int = 0  # steps other than join(): a plan without any is a final answer


class Run:
    def __init__(self, spec: RunSpec, worker: WorkerClient, gateway: GatewayClient):
        self.spec = spec
        self._worker = worker
        self._gateway = gateway
        self._queue: asyncio.Queue[RunEvent] = asyncio.Queue()
        self._calls: dict[str, _Call] = {}
        self._stream: ExecuteStream | None = None
        self._timing = TimingRecorder()
        self._fences = fence_tools(spec.tools)
        self._decoding = False
        self._delta_at = 0.0
        self._abort: AbortVerdict | None = None
        self._generation_id = ""
        self._gateway_down = ""  # why the gateway stream failed, once it has
        self._current: _Call | None = None
        self._tasks: set[asyncio.Task] = set()  # plan steps in flight
        self._counted = False  # the run's end is in the metrics and the log
        self._output_started = False  # a token delta went out
        # Every downstream call gets what is left of the run's own deadline.
        self._deadline = time.monotonic() + spec.timeout

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
            main.cancel()
            for task in self._tasks:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await main
            if self._stream is not None:
                self._stream.cancel()

    # ---- the run ---------------------------------------------------------

    def _remaining(self) -> float:
        return max(0.001, self._deadline - time.monotonic())

    def _emit(self, event: RunEvent) -> None:
        self._queue.put_nowait(event)

    async def _main(self) -> None:
        reason, message, final_text, rejected = FinishReason.ERROR, "", "", False
        try:
            async with asyncio.timeout(self.spec.timeout):
                reason, message, final_text = await self._rounds()
        except TimeoutError:
            reason, message = FinishReason.DEADLINE_EXCEEDED, "the run's deadline passed"
        except WorkerRejected as e:  # the request itself is bad; before any output, say so
            reason, message, rejected = FinishReason.ERROR, str(e), not self._output_started
        except Exception as e:  # a failed service ends the run with a clear reason
            log.warning("run failed", error=str(e))
            reason, message = FinishReason.ERROR, str(e)
        if self._stream is not None:
            if reason in (FinishReason.STOP, FinishReason.MAX_ROUNDS, FinishReason.FORCED_END):
                await self._stream.finish(wait=5.0)
            else:
                self._stream.cancel()
        timing = self._ended(reason, message)
        self._emit(RunFinished(reason, message, final_text, timing, rejected=rejected))

    def _ended(self, reason: FinishReason, message: str):
        """Counts and logs the run's end, once, whatever ended it."""
        timing = self._timing.summary()
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
        for round_no in range(self.spec.max_rounds):
            self._emit(RoundStarted(round_no))
            text, done = await self._generate(round_no, messages)
            calls = [
                c
                for c in self._calls.values()
                if c.round == round_no
                and not c.step_of
                and not (c.tool is PLAN_TOOL and not c.tool_steps and not c.failed)
            ]
            if self._abort is not None:
                verdict = self._abort
                for call in self._calls.values():  # plan steps included
                    if call.round != round_no or call.tool in (None, PLAN_TOOL):
                        continue
                    if not call.outcome.done() and self._stream is not None:
                        self._stream.cancel_call(call.call_id, "the run was aborted")
                if retries <= 0:
                    return FinishReason.ABORTED, verdict.reason, text
                # Re-prompt: the model reads what it wrote and why it was stopped.
                retries -= 1
                self._abort = None
                messages.append(Message("assistant", text))
                messages.append(_verdict_message(self._calls[verdict.call_id], verdict))
                continue
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
        forced = self.spec.forced_completions
        self._generation_id = f"{self.spec.run_id}-r{round_no}"
        scanner = (
            PlanScanner()
            if Envelope.PLAN in self.spec.envelopes
            else EnvelopeScanner(
                formats_named(self.spec.envelopes), ScanContext(fence_tools=self._fences)
            )
        )
        parts: list[str] = []
        done: WorkerDone | None = None
        self._decoding = True
        start = time.perf_counter()
        stream = self._worker.generate(
            self._generation_id,
            messages,
            list(self.spec.tools.values()),
            self.spec.sampling,
            forced[round_no] if round_no < len(forced) else None,
            timeout=self._remaining(),
        )
        try:
            # aclosing: leaving the loop early must cancel the worker's stream now.
            async with contextlib.aclosing(stream):
                async for item in stream:
                    if isinstance(item, WorkerDone):
                        done = item
                        break
                    self._delta_at = time.perf_counter()
                    self._output_started = True
                    parts.append(item.text)
                    self._emit(TokenDelta(round_no, item.text, item.token_count))
                    self._timing.tokens(item.token_count)
                    for event in scanner.feed(item.text):
                        self._on_scan(round_no, event)
                    if self._abort is not None:
                        break  # leaving the stream stops decoding
        finally:
            self._decoding = False
            self._timing.decoded(start, time.perf_counter())
        if self._abort is None:  # an aborted call was cut on purpose: no parse error
            for event in scanner.finish():
                self._on_scan(round_no, event)
        return "".join(parts), done or WorkerDone(FinishReason.ABORTED, 0, 0.0, 0.0)

    # ---- calls -----------------------------------------------------------

    def _on_scan(self, round_no: int, event) -> None:
        if isinstance(event, CallOpened):
            call = _Call(f"call-{len(self._calls)}", round_no, event.envelope)
            call.outcome = asyncio.get_running_loop().create_future()
            self._calls[call.call_id] = call
            self._current = call
            if event.envelope == Envelope.PLAN:
                self._start_call(call, PLAN_TOOL)
                call.parser = parser_for(PLAN_TOOL.partial_mode)
            elif event.body is CallBody.CALL_JSON:  # the JSON names the tool
                call.parser = ToolCallTagParser(lambda name: self._arguments_of(call, name))
            elif event.body is CallBody.ARGUMENTS:  # the envelope named it
                try:
                    call.parser = self._arguments_of(call, event.tool)
                except ParseFailure as e:
                    self._parse_failed(call, str(e))
            else:  # a fence: its language named the tool, its text is the command
                tool = self.spec.tools[event.tool]
                self._start_call(call, tool)
                call.parser = parser_for(tool.partial_mode)
            return
        call = self._current
        if call.failed:
            return  # a call that could not be parsed takes no more text
        try:
            if isinstance(event, CallText):
                call.text.append(event.text)
                units = call.parser.feed(event.text)
            else:
                units = call.parser.finish()
            for unit in units:
                self._unit_ready(call, unit)
        except ParseFailure as e:
            self._parse_failed(call, str(e))
            return
        if isinstance(event, CallClosed):
            self._close_call(call)

    def _arguments_of(self, call: _Call, name: str) -> UnitParser:
        """The call's text named its tool: the call starts now, and its
        arguments go to the parser returned."""
        tool = self.spec.tools.get(name)
        if tool is None:
            known = ", ".join(sorted(self.spec.tools)) or "none"
            raise ParseFailure(f"unknown tool {name!r}; available: {known}")
        self._start_call(call, tool)
        return arguments_parser_for(tool.partial_mode, tool.command_field)

    def _start_call(self, call: _Call, tool: ToolInfo, session_key: str | None = None) -> None:
        """Opens the call on the gateway; calls share the run's sessions
        unless given a key ("" for a session of the call's own)."""
        call.tool = tool
        self._emit(ToolCallStarted(call.call_id, tool.name, call.round, tool.partial_mode))
        if tool is PLAN_TOOL:
            return  # its steps are the calls
        key = self.spec.run_id if session_key is None else session_key
        self._ensure_stream().open(call.call_id, tool.name, session_key=key)
        if self._gateway_down:
            self._fail_call(call, self._gateway_down)

    def _parse_failed(self, call: _Call, message: str) -> None:
        """The call's text is malformed: a ParseError event, the call's work is
        cancelled, and the model reads the error in the next round."""
        call.failed = True
        error = ParseError(call.call_id, message)
        self._emit(error)
        if call.tool not in (None, PLAN_TOOL) and self._stream is not None:
            self._stream.cancel_call(call.call_id, f"parse error: {message}")
        if not call.outcome.done():
            call.outcome.set_result(error)

    def _unit_ready(self, call: _Call, unit: ParsedUnit) -> None:
        check_unit(call.tool.partial_mode, unit.text)
        # The one difference between the modes.
        if self.spec.partial and call.tool.partial_safe:
            self._dispatch(call, unit, self._delta_at)
        else:
            call.held.append((unit, self._delta_at))

    def _dispatch(self, call: _Call, unit: ParsedUnit, completed_at: float) -> None:
        now = time.perf_counter()
        self._timing.dispatched(now - completed_at)
        metrics.PARSE_LAG.observe(now - completed_at)
        metrics.UNITS_DISPATCHED.labels(str(self._decoding).lower()).inc()
        self._emit(
            UnitDispatched(
                call.call_id, unit.index, unit.text, unit.field, self._decoding, unit.depends_on
            )
        )
        call.units_sent += 1
        if call.tool is PLAN_TOOL:
            self._start_step(call, unit)
        else:
            self._ensure_stream().unit(call.call_id, unit)

    def _close_call(self, call: _Call) -> None:
        for unit, completed_at in call.held:
            self._dispatch(call, unit, completed_at)
        call.held.clear()
        if call.tool is PLAN_TOOL:
            self._spawn(self._finish_plan(call))
            return
        parser = call.parser
        full_text = (
            parser.arguments_text if isinstance(parser, ToolCallTagParser) else "".join(call.text)
        )
        self._ensure_stream().close_call(call.call_id, full_text, call.units_sent)

    # ---- plans -----------------------------------------------------------

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _start_step(self, plan: _Call, unit: ParsedUnit) -> None:
        n = int(unit.field)
        plan.steps[n] = asyncio.get_running_loop().create_future()
        plan.step_texts[n] = unit.text
        if not unit.text.lstrip().startswith(JOIN + "("):
            plan.tool_steps += 1
        self._spawn(self._run_step(plan, n, unit))

    async def _run_step(self, plan: _Call, n: int, unit: ParsedUnit) -> None:
        """Waits for the steps this one names, then runs it as a call of its tool."""
        result = plan.steps[n]
        try:
            inputs = {}
            for d in unit.depends_on:
                dep = plan.steps.get(d)
                if dep is None:
                    raise ParseFailure(f"step ${n} uses ${d}, which the plan has not defined")
                ok, output = await dep
                if not ok:
                    raise ParseFailure(f"step ${n} needs ${d}, which failed")
                inputs[d] = output
            step = bind(unit.text, inputs)
            if step.tool == JOIN:
                result.set_result((True, ""))
                return
            tool = self.spec.tools.get(step.tool)
            if tool is None:
                known = ", ".join(sorted(self.spec.tools)) or "none"
                raise ParseFailure(f"step ${n}: unknown tool {step.tool!r}; available: {known}")
            result.set_result(await self._step_call(plan, n, tool, arguments_for(tool, step)))
        except ParseFailure as e:
            result.set_result((False, str(e)))

    async def _step_call(
        self, plan: _Call, n: int, tool: ToolInfo, arguments: str
    ) -> tuple[bool, str]:
        call = _Call(f"{plan.call_id}.{n}", plan.round, plan.envelope, step_of=plan.call_id)
        call.outcome = asyncio.get_running_loop().create_future()
        self._calls[call.call_id] = call
        # A session of its own: independent steps of one tool run in parallel
        # (a shared interpreter would run them one after another).
        self._start_call(call, tool, session_key="")
        parser = arguments_parser_for(tool.partial_mode, tool.command_field)
        call.parser, call.text = parser, [arguments]
        try:
            units = parser.feed(arguments) + parser.finish()
            for unit in units:
                check_unit(tool.partial_mode, unit.text)
        except ParseFailure as e:
            self._parse_failed(call, str(e))
        else:
            for unit in units:
                self._dispatch(call, unit, time.perf_counter())
            self._close_call(call)
        outcome = await call.outcome
        if isinstance(outcome, ParseError):
            return False, f"error: {outcome.message}"
        if outcome.error_code:
            return False, f"error ({outcome.error_code}): {outcome.error_message}"
        return outcome.ok, outcome.output

    async def _finish_plan(self, plan: _Call) -> None:
        """The plan is complete and its steps dispatched: its outcome, once
        every step has ended, is what the model reads back."""
        results = [await plan.steps[n] for n in sorted(plan.steps)]
        outputs = {
            n: (plan.step_texts[n], output)
            for n, (_, output) in zip(sorted(plan.steps), results, strict=True)
        }
        outcome = CallOutcome(
            plan.call_id,
            all(ok for ok, _ in results),
            output=plan_summary(outputs),
            units_executed=len(results),
        )
        self._emit(outcome)
        if not plan.outcome.done():
            plan.outcome.set_result(outcome)

    # ---- gateway ---------------------------------------------------------

    def _ensure_stream(self) -> ExecuteStream:
        if self._stream is None:
            self._stream = self._gateway.stream(
                self.spec.run_id, self._remaining(), self._on_gateway, self._on_gateway_failure
            )
        return self._stream

    async def _on_gateway(self, event: GatewayEvent) -> None:
        if isinstance(event, tuple):
            return  # unit started: its time is taken from the result's duration
        call = self._calls.get(event.call_id)
        if call is None:
            return
        if isinstance(event, UnitResult):
            self._timing.tool_ran(time.perf_counter(), event.duration_seconds)
            self._emit(event)
        elif isinstance(event, UnitProgress):
            self._emit(event)
        elif isinstance(event, CallOutcome):
            self._emit(event)
            if not call.outcome.done():
                call.outcome.set_result(event)
        elif isinstance(event, AbortVerdict):
            self._emit(event)
            if self._abort is None:
                self._abort = event
                await self._worker.abort(self._generation_id)

    async def _on_gateway_failure(self, message: str) -> None:
        """The gateway died: every open call fails with its message; the run
        finishes its round and reports the calls' errors."""
        self._gateway_down = message
        for call in self._calls.values():
            if call.tool is not None:
                self._fail_call(call, message)

    def _fail_call(self, call: _Call, message: str) -> None:
        if not call.outcome.done():
            outcome = CallOutcome(call.call_id, False, error_code="SANDBOX", error_message=message)
            self._emit(outcome)
            call.outcome.set_result(outcome)


def _verdict_message(call: _Call, verdict: AbortVerdict) -> Message:
    where = f" (argument {verdict.field!r})" if verdict.field else ""
    content = f"aborted{where}: {verdict.reason}. Correct the call and try again."
    name = call.tool.name if call.tool else ""
    return Message("tool", content, name=name, tool_call_id=call.call_id)


def _tool_message(call: _Call, outcome: CallOutcome | ParseError) -> Message:
    name = call.tool.name if call.tool else ""
    if isinstance(outcome, ParseError):
        content = f"error: {outcome.message}"
    elif outcome.error_code:
        content = f"error ({outcome.error_code}): {outcome.error_message}"
    else:
        content = outcome.output
    return Message("tool", content, name=name, tool_call_id=call.call_id)
