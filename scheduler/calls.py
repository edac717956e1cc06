"""The table of a run's tool calls, and its Execute stream.

Calls open as the envelope scanner finds them; each call's text goes to its
parser, and each complete unit is sent on — now, or once the call is
complete. That choice, in `CallTable._unit_ready`, is the one place where
PARTIAL and SEQUENTIAL mode differ. A call's units go to its target: the
gateway for a tool call, the plan runner (scheduler/plans.py) for a plan.
The gateway's events come back here and end each call with one outcome.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from conveyor_common.types import Envelope
from scheduler import metrics
from scheduler.envelopes import CallBody, CallClosed, CallOpened, CallText, ScanEvent
from scheduler.events import (
    AbortVerdict,
    CallOutcome,
    ClientToolCall,
    ClientToolCallDelta,
    ParseError,
    RunEvent,
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
from scheduler.timing import TimingRecorder
from scheduler.tools import ToolInfo


class CallTarget(Protocol):
    """Where a call's units go once they are sent."""

    def unit(self, call: Call, unit: ParsedUnit) -> None: ...

    def close(self, call: Call, full_text: str) -> None: ...

    def cancel(self, call: Call, reason: str) -> None: ...


@dataclass(eq=False)
class Call:
    call_id: str
    round: int
    envelope: str
    outcome: asyncio.Future  # CallOutcome | ParseError
    tool: ToolInfo | None = None  # None until a tag call's JSON names it
    target: CallTarget | None = None  # set when the call starts
    parser: UnitParser | None = None
    text: list[str] = field(default_factory=list)
    held: list[tuple[ParsedUnit, float]] = field(default_factory=list)  # (unit, completed at)
    units_sent: int = 0
    arguments_sent: int = 0  # of a client call's arguments text, streamed so far
    failed: bool = False  # its text could not be parsed
    step: bool = False  # a plan step's call: its outcome goes to its plan
    final_answer: bool = False  # a plan of no tool step: the model's answer, not a call

    @property
    def read_back(self) -> bool:
        """Whether the model reads this call's outcome in the next round."""
        return not self.step and not self.final_answer


class PlanHandler(Protocol):
    """What the table asks of the plan runner (scheduler/plans.py)."""

    def start(self, call: Call) -> None: ...


class CallTable:
    def __init__(
        self,
        *,
        run_id: str,
        tools: dict[str, ToolInfo],
        partial: bool,
        gateway: GatewayClient,
        emit: Callable[[RunEvent], None],
        timing: TimingRecorder,
        remaining: Callable[[], float],
        on_verdict: Callable[[], Awaitable[None]],
    ):
        self.calls: dict[str, Call] = {}
        self.tools = tools
        self.abort: AbortVerdict | None = None  # the first verdict of the round
        self.plans: PlanHandler | None = None
        # What the generation pass says of the output, for each unit's timing.
        self.decoding = False
        self.delta_at = 0.0
        self._run_id = run_id
        self._partial = partial
        self._gateway = gateway
        self._emit = emit
        self._timing = timing
        self._remaining = remaining
        self._on_verdict = on_verdict
        self._stream: ExecuteStream | None = None
        self._gateway_down = ""  # why the gateway stream failed, once it has
        self._current: Call | None = None
        self._to_gateway = _GatewayTarget(self)
        self._to_client = _ClientTarget(emit)

    # ---- calls from the scan -----------------------------------------------

    def new_call(self, call_id: str, round_no: int, envelope: str, step: bool = False) -> Call:
        call = Call(
            call_id, round_no, envelope, asyncio.get_running_loop().create_future(), step=step
        )
        self.calls[call.call_id] = call
        return call

    def on_scan(self, round_no: int, event: ScanEvent) -> None:
        if isinstance(event, CallOpened):
            self._opened(self.new_call(f"call-{len(self.calls)}", round_no, event.envelope), event)
            return
        call = self._current
        if call.failed:
            return  # a call that could not be parsed takes no more text
        try:
            if isinstance(event, CallText):
                call.text.append(event.text)
                units = call.parser.feed(event.text)
                if call.tool is not None and call.tool.client:
                    self._client_arguments(call)
            else:
                units = call.parser.finish()
            for unit in units:
                self._unit_ready(call, unit)
        except ParseFailure as e:
            self.parse_failed(call, str(e))
            return
        if isinstance(event, CallClosed):
            self.close(call)

    def _opened(self, call: Call, event: CallOpened) -> None:
        self._current = call
        if event.envelope == Envelope.PLAN:
            self.plans.start(call)
        elif event.body is CallBody.CALL_JSON:  # the JSON names the tool
            call.parser = ToolCallTagParser(lambda name: self._arguments_of(call, name))
        elif event.body is CallBody.ARGUMENTS:  # the envelope named it
            try:
                call.parser = self._arguments_of(call, event.tool)
            except ParseFailure as e:
                self.parse_failed(call, str(e))
        else:  # a fence: its language named the tool, its text is the command
            tool = self.tools[event.tool]
            self.start_tool_call(call, tool)
            call.parser = parser_for(tool.partial_mode)

    def _client_arguments(self, call: Call) -> None:
        """Streams the new part of a client call's arguments (formats whose
        parser keeps the arguments text; the others send them whole at close)."""
        parser = call.parser
        if not isinstance(parser, ToolCallTagParser):
            return
        text = parser.arguments_text
        if len(text) > call.arguments_sent:
            delta = text[call.arguments_sent :]
            call.arguments_sent = len(text)
            self._emit(ClientToolCallDelta(call.call_id, call.tool.name, delta))

    def _arguments_of(self, call: Call, name: str) -> UnitParser:
        """The call's text named its tool: the call starts now, and its
        arguments go to the parser returned."""
        tool = self.tools.get(name)
        if tool is None:
            known = ", ".join(sorted(self.tools)) or "none"
            raise ParseFailure(f"unknown tool {name!r}; available: {known}")
        self.start_tool_call(call, tool)
        return arguments_parser_for(tool.partial_mode, tool.command_field)

    def started(self, call: Call, tool: ToolInfo, target: CallTarget) -> None:
        call.tool, call.target = tool, target
        self._emit(ToolCallStarted(call.call_id, tool.name, call.round, tool.partial_mode))

    def start_tool_call(self, call: Call, tool: ToolInfo, session_key: str | None = None) -> None:
        """Opens the call on the gateway; calls share the run's sessions
        unless given a key ("" for a session of the call's own). A client
        tool's call goes to the client instead, whole, once complete."""
        if tool.client:
            self.started(call, tool, self._to_client)
            return
        self.started(call, tool, self._to_gateway)
        key = self._run_id if session_key is None else session_key
        self._ensure_stream().open(call.call_id, tool.name, session_key=key)
        if self._gateway_down:
            self._fail_call(call, self._gateway_down)

    def parse_failed(self, call: Call, message: str) -> None:
        """The call's text is malformed: a ParseError event, the call's work is
        cancelled, and the model reads the error in the next round."""
        call.failed = True
        error = ParseError(call.call_id, message)
        self._emit(error)
        if call.target is not None:
            call.target.cancel(call, f"parse error: {message}")
        if not call.outcome.done():
            call.outcome.set_result(error)

    def _unit_ready(self, call: Call, unit: ParsedUnit) -> None:
        if call.tool.client:
            return  # the client gets the arguments whole, at the call's close
        check_unit(call.tool.partial_mode, unit.text)
        # The one difference between the modes.
        if self._partial and call.tool.partial_safe:
            self.dispatch(call, unit, self.delta_at)
        else:
            call.held.append((unit, self.delta_at))

    def dispatch(self, call: Call, unit: ParsedUnit, completed_at: float) -> None:
        now = time.perf_counter()
        self._timing.dispatched(now - completed_at)
        metrics.PARSE_LAG.observe(now - completed_at)
        metrics.UNITS_DISPATCHED.labels(str(self.decoding).lower()).inc()
        self._emit(
            UnitDispatched(
                call.call_id, unit.index, unit.text, unit.field, self.decoding, unit.depends_on
            )
        )
        call.units_sent += 1
        call.target.unit(call, unit)

    def close(self, call: Call) -> None:
        """The call's text is complete: held units go out, then its close."""
        for unit, completed_at in call.held:
            self.dispatch(call, unit, completed_at)
        call.held.clear()
        parser = call.parser
        full_text = (
            parser.arguments_text if isinstance(parser, ToolCallTagParser) else "".join(call.text)
        )
        call.target.close(call, full_text)

    def cancel_round(self, round_no: int, reason: str) -> None:
        """Stops every unfinished call of the round (an abort verdict came)."""
        for call in self.calls.values():
            if call.round == round_no and call.target is not None and not call.outcome.done():
                call.target.cancel(call, reason)

    # ---- the gateway -------------------------------------------------------

    def _ensure_stream(self) -> ExecuteStream:
        if self._stream is None:
            self._stream = self._gateway.stream(
                self._run_id, self._remaining(), self._on_gateway, self._on_gateway_failure
            )
        return self._stream

    async def finish_stream(self, wait: float) -> None:
        if self._stream is not None:
            await self._stream.finish(wait)

    def cancel_stream(self) -> None:
        if self._stream is not None:
            self._stream.cancel()

    async def _on_gateway(self, event: GatewayEvent) -> None:
        if isinstance(event, tuple):
            return  # unit started: its time is taken from the result's duration
        call = self.calls.get(event.call_id)
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
            if self.abort is None:
                self.abort = event
                await self._on_verdict()

    async def _on_gateway_failure(self, message: str) -> None:
        """The gateway died: every open call fails with its message; the run
        finishes its round and reports the calls' errors."""
        self._gateway_down = message
        for call in self.calls.values():
            if call.target is self._to_gateway:
                self._fail_call(call, message)

    def _fail_call(self, call: Call, message: str) -> None:
        if not call.outcome.done():
            outcome = CallOutcome(call.call_id, False, error_code="SANDBOX", error_message=message)
            self._emit(outcome)
            call.outcome.set_result(outcome)


class _ClientTarget:
    """A client tool's call: its complete arguments go out as an event, and
    the run ends after the round (the client runs it and sends the result)."""

    def __init__(self, emit: Callable[[RunEvent], None]):
        self._emit = emit

    def unit(self, call: Call, unit: ParsedUnit) -> None:
        pass  # units never come: _unit_ready keeps them back

    def close(self, call: Call, full_text: str) -> None:
        # Not stripped: the streamed deltas, joined, are this text's beginning.
        event = ClientToolCall(call.call_id, call.tool.name, full_text, call.round)
        self._emit(event)
        if not call.outcome.done():
            call.outcome.set_result(event)

    def cancel(self, call: Call, reason: str) -> None:
        if not call.outcome.done():
            call.outcome.set_result(
                CallOutcome(call.call_id, False, error_code="CANCELLED", error_message=reason)
            )


class _GatewayTarget:
    """A tool call's units, close and cancel go to the run's Execute stream."""

    def __init__(self, table: CallTable):
        self._table = table

    def unit(self, call: Call, unit: ParsedUnit) -> None:
        self._table._ensure_stream().unit(call.call_id, unit)

    def close(self, call: Call, full_text: str) -> None:
        self._table._ensure_stream().close_call(call.call_id, full_text, call.units_sent)

    def cancel(self, call: Call, reason: str) -> None:
        if self._table._stream is not None:
            self._table._stream.cancel_call(call.call_id, reason)
