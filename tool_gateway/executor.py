"""The calls of one Execute stream.

Each call gets its own task and queue: its units run strictly in order in its
session, while a slow call never holds up another. Calls that share a session
key share one session for the life of the stream, and their units run in the
order they arrived on the stream (`session_order`); a call without a key gets
a session of its own. Every call ends with exactly one CallFinished or
CallFailed, and `shutdown` leaves no tool process behind.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import deque
from dataclasses import dataclass, field

import structlog
from opentelemetry import context as otel_context
from opentelemetry import trace

from conveyor_common import tracing
from tool_gateway.messages import (
    Aborted,
    CallFailed,
    CallFinished,
    CancelCall,
    CloseCall,
    Event,
    Malformed,
    OpenCall,
    Request,
    RunUnit,
    UnitFinished,
    UnitProgress,
    UnitStarted,
)
from tool_gateway.metrics import CALLS, TOOL_SECONDS, UNITS
from tool_gateway.registry import ToolRegistry
from tool_gateway.session_order import SessionOrder, Ticket
from tool_gateway.tools.base import (
    CallOutcome,
    Tool,
    ToolErrorCode,
    ToolFailure,
    ToolSession,
    Unit,
    UnitOutcome,
)

log = structlog.get_logger("gateway")
SERVICE = "tool_gateway"  # on its spans (conveyor_common/tracing.py)


@dataclass(eq=False)
class _Call:
    open: OpenCall
    tool: Tool
    timeout: float
    queue: asyncio.Queue[Unit | CloseCall] = field(default_factory=asyncio.Queue)
    closed: bool = False  # a CloseCall is queued
    stop: ToolFailure | None = None  # why the call is being stopped from outside
    task: asyncio.Task | None = None
    # The tickets of the queued units, in queue order (shared sessions only).
    tickets: deque[Ticket] = field(default_factory=deque)

    @property
    def call_id(self) -> str:
        return self.open.call_id

    @property
    def shared_key(self) -> tuple[str, str] | None:
        """The key of the session this call shares with others, if it does."""
        if not self.open.session_key or self.tool.session_per_call:
            return None
        return (self.tool.spec.name, self.open.session_key)


class StreamExecutor:
    def __init__(self, registry: ToolRegistry, call_timeout: float):
        self._registry = registry
        self._call_timeout = call_timeout
        # Unbounded: events answer the client's own units, one or two each.
        self._events: asyncio.Queue[Event | None] = asyncio.Queue()
        self._calls: dict[str, _Call] = {}  # calls whose last event is not out yet
        self._ended: set[str] = set()  # call ids whose last event is out
        self._shared: dict[tuple[str, str], asyncio.Task[ToolSession]] = {}
        self._order = SessionOrder()
        self._sessions: set[ToolSession] = set()  # every open session, for shutdown
        self._shutdown: asyncio.Task | None = None

    async def next_event(self) -> Event | None:
        """The next event to send; None once the stream is done."""
        return await self._events.get()

    # ---- requests (called for each message, in order) -------------------

    def submit(self, request: Request) -> None:
        if self._shutdown is not None:
            return
        if isinstance(request, OpenCall):
            self._open(request)
            return
        if isinstance(request, Malformed):
            self._reject(request.call_id, request.problem)
            return
        call = self._calls.get(request.call_id)
        if call is None:
            if request.call_id in self._ended:
                return  # the call already failed; the client may not know yet
            self._reject(request.call_id, f"no open call {request.call_id!r}: send open first")
        elif isinstance(request, RunUnit):
            if call.closed:
                self._stop(call, ToolErrorCode.BAD_REQUEST, "a unit arrived after close")
            else:
                if (key := call.shared_key) is not None:
                    call.tickets.append(self._order.take(key))
                call.queue.put_nowait(request.unit)
        elif isinstance(request, CloseCall):
            if call.closed:
                self._stop(call, ToolErrorCode.BAD_REQUEST, "the call was closed twice")
            else:
                call.closed = True
                call.queue.put_nowait(request)
        elif isinstance(request, CancelCall):
            reason = f": {request.reason}" if request.reason else ""
            self._stop(call, ToolErrorCode.CANCELLED, f"the call was cancelled{reason}")

    def _open(self, request: OpenCall) -> None:
        call_id = request.call_id
        if call_id in self._calls:
            self._stop(self._calls[call_id], ToolErrorCode.BAD_REQUEST, "call_id opened twice")
            return
        if not call_id or call_id in self._ended:
            self._reject(call_id, f"call_id {call_id!r} is empty or was already used")
            return
        tool = self._registry.get(request.tool_name)
        if tool is None:
            hosted = ", ".join(self._registry.names())
            self._reject(
                call_id,
                f"unknown tool {request.tool_name!r}; this gateway has: {hosted}",
                ToolErrorCode.UNKNOWN_TOOL,
            )
            return
        timeout = self._call_timeout
        if request.timeout_seconds > 0:  # a request may shorten the limit, not extend it
            timeout = min(timeout, request.timeout_seconds)
        call = _Call(request, tool, timeout)
        self._calls[call_id] = call
        call.task = asyncio.create_task(self._run(call), name=f"tool call {call_id}")

    def _reject(
        self, call_id: str, message: str, code: ToolErrorCode = ToolErrorCode.BAD_REQUEST
    ) -> None:
        """Fails a call that has no task (never opened, or unknown tool)."""
        self._ended.add(call_id)
        self._events.put_nowait(CallFailed(call_id, code, message))
        CALLS.labels("", code.value).inc()
        log.info("call rejected", call_id=call_id, error=code.value, message=message)

    def _stop(self, call: _Call, code: ToolErrorCode, message: str) -> None:
        """Stops a running call; its task sends the error as its last event."""
        if call.stop is None and call.task is not None:
            call.stop = ToolFailure(code, message)
            call.task.cancel()

    # ---- one call -------------------------------------------------------

    async def _run(self, call: _Call) -> None:
        structlog.contextvars.bind_contextvars(call_id=call.call_id, run_id=call.open.run_id)
        started = time.monotonic()
        outcomes: list[UnitOutcome] = []
        session: ToolSession | None = None
        last: Event | None = None
        span = tracing.tracer().start_span(
            f"tool_call {call.tool.spec.name}",
            attributes={
                tracing.SERVICE_ATTRIBUTE: SERVICE,
                "conveyor.call_id": call.call_id,
                "conveyor.run_id": call.open.run_id,
                "conveyor.tool": call.tool.spec.name,
            },
        )
        token = otel_context.attach(trace.set_span_in_context(span))
        try:
            try:
                async with asyncio.timeout(call.timeout):
                    session = await self._session_for(call)
                    outcome = await self._run_units(call, session, outcomes)
                last = CallFinished(call.call_id, outcome)
            except asyncio.CancelledError:
                if call.stop is None:
                    raise  # the stream is shutting down: no more events
                last = CallFailed(call.call_id, call.stop.code, call.stop.message)
            except TimeoutError:
                last = CallFailed(
                    call.call_id,
                    ToolErrorCode.TIMEOUT,
                    f"the call ran past its {call.timeout:g} s limit and was stopped",
                )
            except ToolFailure as e:
                last = CallFailed(call.call_id, e.code, e.message)
            except Exception as e:
                log.exception("tool call crashed")
                last = CallFailed(
                    call.call_id,
                    ToolErrorCode.INTERNAL,
                    f"the gateway failed: {type(e).__name__}: {e}",
                )
            self._end(call, last)
        finally:
            if isinstance(last, CallFailed):
                span.set_status(trace.StatusCode.ERROR, f"{last.code.name}: {last.message[:200]}")
            span.set_attribute("conveyor.units", len(outcomes))
            span.end()
            otel_context.detach(token)
            for ticket in call.tickets:  # units that will never run
                self._order.done(ticket)
            self._log_call(call, last, outcomes, time.monotonic() - started)
            if session is not None:
                await self._release(call, session)

    async def _run_units(
        self, call: _Call, session: ToolSession, outcomes: list[UnitOutcome]
    ) -> CallOutcome:
        tool = call.tool.spec.name
        while not isinstance(item := await call.queue.get(), CloseCall):
            if item.index != len(outcomes):
                raise ToolFailure(
                    ToolErrorCode.BAD_REQUEST,
                    f"unit {item.index} arrived where unit {len(outcomes)} was expected "
                    "(a unit was lost or sent twice)",
                )
            ticket = call.tickets[0] if call.tickets else None
            if ticket is not None:
                await self._order.wait(ticket)  # earlier units of the session first
            self._events.put_nowait(UnitStarted(call.call_id, item.index))
            session.progress_sink = functools.partial(self._progress, call.call_id)
            try:
                with tracing.tracer().start_as_current_span(
                    f"unit {item.index}",
                    attributes={
                        tracing.SERVICE_ATTRIBUTE: SERVICE,
                        "conveyor.call_id": call.call_id,
                        "conveyor.unit": item.index,
                    },
                ) as unit_span:
                    outcome = await session.run_unit(item)
                    unit_span.set_attribute("conveyor.ok", outcome.ok)
            finally:
                if ticket is not None:
                    call.tickets.popleft()
                    self._order.done(ticket)
            outcomes.append(outcome)
            UNITS.labels(tool, "ok" if outcome.ok else "exception").inc()
            TOOL_SECONDS.labels(tool).inc(outcome.duration_seconds)
            self._events.put_nowait(UnitFinished(call.call_id, outcome))
            if outcome.verdict is not None:
                return self._aborted(call, outcome, outcomes)
        # unit_count 0 means the client did not say.
        if item.unit_count and item.unit_count != len(outcomes):
            raise ToolFailure(
                ToolErrorCode.BAD_REQUEST,
                f"close says {item.unit_count} units were sent, but {len(outcomes)} arrived",
            )
        output = await session.finish(item.full_text, outcomes)
        return CallOutcome(
            ok=all(o.ok for o in outcomes),
            output=output,
            units_executed=len(outcomes),
            tool_seconds=sum(o.duration_seconds for o in outcomes),
        )

    def _progress(self, call_id: str, index: int, stdout: str) -> None:
        if call_id in self._calls:  # not after the call's last event
            self._events.put_nowait(UnitProgress(call_id, index, stdout))

    def _aborted(
        self, call: _Call, outcome: UnitOutcome, outcomes: list[UnitOutcome]
    ) -> CallOutcome:
        """Sends the verdict and ends the call without waiting for its close:
        later units of a doomed call are dropped (the call has ended)."""
        verdict = outcome.verdict
        self._events.put_nowait(Aborted(call.call_id, outcome.index, verdict.reason, verdict.field))
        where = f" (argument {verdict.field!r})" if verdict.field else ""
        return CallOutcome(
            ok=False,
            output=f"aborted{where}: {verdict.reason}",
            units_executed=len(outcomes),
            tool_seconds=sum(o.duration_seconds for o in outcomes),
        )

    def _end(self, call: _Call, last: Event) -> None:
        """Sends the call's last event; nothing can stop the call after this."""
        self._calls.pop(call.call_id, None)
        self._ended.add(call.call_id)
        self._events.put_nowait(last)

    def _log_call(
        self, call: _Call, last: Event | None, outcomes: list[UnitOutcome], seconds: float
    ) -> None:
        if isinstance(last, CallFinished):
            result = "ok" if last.outcome.ok else "failed"
        elif isinstance(last, CallFailed):
            result = last.code.value
        else:
            result = "dropped"  # the stream went away first
        CALLS.labels(call.tool.spec.name, result).inc()
        log.info(
            "call done",
            tool=call.tool.spec.name,
            session_key=call.open.session_key,
            result=result,
            error=last.message if isinstance(last, CallFailed) else "",
            units=len(outcomes),
            tool_seconds=round(sum(o.duration_seconds for o in outcomes), 4),
            seconds=round(seconds, 4),
        )

    # ---- sessions -------------------------------------------------------

    async def _session_for(self, call: _Call) -> ToolSession:
        key = call.shared_key
        if key is None:
            session = await call.tool.open_session(call.open.session_key)
            self._sessions.add(session)
            return session
        task = self._shared.get(key)
        if task is not None and task.done():
            failed = task.cancelled() or task.exception() is not None
            if failed or not task.result().alive:
                task = None  # a dead or failed session: start afresh
        if task is None:
            task = asyncio.create_task(self._open_shared(call.tool, call.open.session_key))
            self._shared[key] = task
        # Shielded: a call that stops waiting must not kill a session others await.
        return await asyncio.shield(task)

    async def _open_shared(self, tool: Tool, session_key: str) -> ToolSession:
        session = await tool.open_session(session_key)
        self._sessions.add(session)
        return session

    async def _release(self, call: _Call, session: ToolSession) -> None:
        """Closes a call's own session, and a shared one that died."""
        if call.open.session_key and not call.tool.session_per_call and session.alive:
            return
        self._sessions.discard(session)
        await session.close()

    # ---- the stream's end -------------------------------------------------

    async def drain(self) -> None:
        """The client sent its last message: calls it never closed can never
        finish, so they are cancelled; the others run to their end."""
        for call in list(self._calls.values()):
            if not call.closed:
                self._stop(
                    call, ToolErrorCode.CANCELLED, "the stream ended before the call was closed"
                )
        tasks = [call.task for call in self._calls.values() if call.task is not None]
        # Shielded: a drain cut short (the stream went away) must not cancel
        # the calls itself; shutdown stops them, once (a second cancel would
        # cut short a tool's own clean-up, such as MCP's cancel notification).
        await asyncio.shield(asyncio.gather(*tasks, return_exceptions=True))
        self._events.put_nowait(None)

    async def shutdown(self) -> None:
        """Stops every call and kills every session process (idempotent)."""
        if self._shutdown is None:
            self._shutdown = asyncio.create_task(self._shutdown_now())
        await asyncio.shield(self._shutdown)

    async def _shutdown_now(self) -> None:
        tasks = [call.task for call in self._calls.values() if call.task is not None]
        tasks += self._shared.values()
        for task in tasks:
            task.cancel()
        for session in list(self._sessions):
            await session.cancel()  # kills at once, before anything else can await
        await asyncio.gather(*tasks, return_exceptions=True)
        for session in list(self._sessions):
            await session.close()
        self._sessions.clear()
        self._events.put_nowait(None)  # wakes a reader still waiting
