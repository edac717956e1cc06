"""Client of ToolGatewayService: the tool list, and one Execute stream per run."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable

import grpc
import structlog
from conveyor.v1 import common_pb2, tool_gateway_pb2, tool_gateway_pb2_grpc

from conveyor_common.clients import Unreachable, channel, outgoing_metadata, wait_connected
from conveyor_common.defaults import CONNECT_TIMEOUT_S
from conveyor_common.security import ClientSecurity
from conveyor_common.types import PartialMode
from scheduler.events import AbortVerdict, CallOutcome, UnitProgress, UnitResult
from scheduler.parsers import ParsedUnit
from scheduler.tools import ToolInfo

_END = object()
log = structlog.get_logger("gateway_client")


class GatewayError(Exception):
    """The gateway failed or could not be reached."""


def _mode(value: int) -> PartialMode:
    """An unknown or unset mode is WHOLE: the call runs once it is complete."""
    try:
        name = common_pb2.PartialMode.Name(value).removeprefix("PARTIAL_MODE_")
    except ValueError:  # a newer gateway's mode this scheduler does not know
        return PartialMode.WHOLE
    return PartialMode.__members__.get(name, PartialMode.WHOLE)


def tool_from_pb(spec: common_pb2.ToolSpec) -> ToolInfo:
    return ToolInfo(
        name=spec.name,
        description=spec.description,
        parameters=json.loads(spec.parameters_json_schema) if spec.parameters_json_schema else {},
        partial_mode=_mode(spec.partial_mode),
        partial_safe=spec.partial_safe,
        command_field=spec.command_field,
    )


def tool_to_pb(tool: ToolInfo) -> common_pb2.ToolSpec:
    """The spec a client of ListTools sees: all the scheduler knows of the tool."""
    return common_pb2.ToolSpec(
        name=tool.name,
        description=tool.description,
        parameters_json_schema=json.dumps(tool.parameters) if tool.parameters else "",
        partial_mode=common_pb2.PartialMode.Value(f"PARTIAL_MODE_{tool.partial_mode.name}"),
        partial_safe=tool.partial_safe,
        command_field=tool.command_field,
    )


# Events the stream hands to the run: a unit started (call_id, index), a unit
# result, a call outcome, an abort verdict; or the stream's failure.
GatewayEvent = tuple[str, int] | UnitResult | UnitProgress | CallOutcome | AbortVerdict


class GatewayClient:
    def __init__(
        self,
        target: str,
        connect_timeout: float = CONNECT_TIMEOUT_S,
        security: ClientSecurity | None = None,
    ):
        self._target = target
        self._connect_timeout = connect_timeout
        self._security = security or ClientSecurity()
        self._channel = channel(target, self._security)
        self._stub = tool_gateway_pb2_grpc.ToolGatewayServiceStub(self._channel)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Each call's: the request id, and the scheduler's token if it has one."""
        return outgoing_metadata() + self._security.metadata()

    async def connected(self, timeout: float | None = None) -> None:
        """Returns once there is a connection; GatewayError after the connect timeout."""
        wait = self._connect_timeout if timeout is None else min(timeout, self._connect_timeout)
        try:
            await wait_connected(self._channel, "tool_gateway", self._target, wait)
        except Unreachable as e:
            raise GatewayError(str(e)) from None

    async def list_tools(self, timeout: float = 10.0) -> dict[str, ToolInfo]:
        await self.connected(timeout)
        try:
            response = await self._stub.ListTools(
                tool_gateway_pb2.ToolGatewayServiceListToolsRequest(),
                timeout=timeout,
                metadata=self.metadata(),
                wait_for_ready=True,
            )
        except grpc.aio.AioRpcError as e:
            raise GatewayError(f"tool_gateway {e.code().name}: {e.details()}") from e
        return {t.name: tool_from_pb(t) for t in response.tools}

    def stream(
        self,
        run_id: str,
        timeout: float,
        on_event: Callable[[GatewayEvent], Awaitable[None]],
        on_failure: Callable[[str], Awaitable[None]],
    ) -> ExecuteStream:
        return ExecuteStream(self, run_id, timeout, on_event, on_failure)

    async def close(self) -> None:
        await self._channel.close()


# A stream that fails UNAVAILABLE (the gateway restarted, or its replica went
# away) is opened again this many times in all, replaying the calls it had
# sent that had not started.
STREAM_ATTEMPTS = 3


class ExecuteStream:
    """The run's Execute stream. Sends never block (an unbounded outbox: the
    units of one run are few and small); a task reads the gateway's events.

    Every request is also kept in a journal, so that when the stream breaks
    before a call has started, the call is sent again on a new stream (to the
    restarted gateway, or another replica) instead of being lost. A call the
    gateway had already started is lost with its session: it fails with the
    stream's error, and so does a waiting call that shares its session (it
    would miss the variables the lost one made)."""

    def __init__(self, client: GatewayClient, run_id, timeout, on_event, on_failure):
        self._client = client
        self._run_id = run_id
        self._deadline = time.monotonic() + timeout
        self._outbox: asyncio.Queue = asyncio.Queue()
        self._on_event = on_event
        self._on_failure = on_failure
        self._journal: list[tool_gateway_pb2.ExecuteRequest] = []
        self._session_of: dict[str, str] = {}  # call id -> session key ("" is its own)
        self._heard: set[str] = set()  # calls the gateway has answered
        self._done: set[str] = set()  # calls whose last event came
        self._lost: set[str] = set()  # calls failed by a broken stream: no more sends
        self._ended = False  # finish() was called: no more requests
        self._call: grpc.aio.StreamStreamCall | None = None
        self._reader = asyncio.create_task(self._read())

    async def _requests(self, outbox: asyncio.Queue):
        while True:
            item = await outbox.get()
            if item is _END:
                return
            yield item

    async def _read(self) -> None:
        for attempt in range(1, STREAM_ATTEMPTS + 1):
            failure = await self._attempt()
            if failure is None:
                return
            code, message = failure
            if code != grpc.StatusCode.UNAVAILABLE or attempt == STREAM_ATTEMPTS:
                break
            if not await self._replay(message):
                break
        else:
            return
        await self._on_failure(message)

    async def _attempt(self) -> tuple[grpc.StatusCode | None, str] | None:
        """One Execute stream until it ends; its failure, if it failed."""
        remaining = self._deadline - time.monotonic()
        try:
            await self._client.connected(max(0.001, remaining))
        except GatewayError as e:
            return None if self._ended and not self._journal else (None, str(e))
        self._call = self._client._stub.Execute(
            self._requests(self._outbox),
            timeout=max(0.001, self._deadline - time.monotonic()),
            metadata=self._client.metadata(),
        )
        try:
            async for response in self._call:
                event = _event_from_pb(response)
                call_id = event[0] if isinstance(event, tuple) else event.call_id
                self._heard.add(call_id)
                if isinstance(event, CallOutcome):
                    self._done.add(call_id)  # and nothing of it is replayed any more
                    self._journal = [r for r in self._journal if r.call_id != call_id]
                await self._on_event(event)
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                return e.code(), f"tool_gateway {e.code().name}: {e.details()}"
        return None

    async def _replay(self, message: str) -> bool:
        """Moves the calls that had not started to a fresh outbox; fails the
        started ones that had not finished. False when nothing is left to send."""
        started = {c for c in self._heard if c not in self._done}
        lost_sessions = {self._session_of[c] for c in self._heard} - {""}
        self._outbox = asyncio.Queue()
        replayed = 0
        for request in self._journal:
            call_id = request.call_id
            if call_id in self._heard or self._session_of.get(call_id) in lost_sessions:
                if call_id not in self._done:
                    started.add(call_id)
                continue
            self._outbox.put_nowait(request)
            replayed += 1
        for call_id in sorted(started - self._lost):
            self._lost.add(call_id)
            self._done.add(call_id)
            await self._on_event(CallOutcome(call_id, False, error_code="SANDBOX",
                                             error_message=message))  # fmt: skip
        self._journal = [r for r in self._journal if r.call_id not in self._lost]
        if self._ended:
            self._outbox.put_nowait(_END)
        if replayed:
            log.info("gateway stream broke; calls that had not started are sent again",
                     calls=replayed, reason=message)  # fmt: skip
        return replayed > 0 or not self._ended

    def open(self, call_id: str, tool: str, session_key: str) -> None:
        self._session_of[call_id] = session_key
        self._send(
            call_id,
            open=tool_gateway_pb2.OpenCall(
                run_id=self._run_id, tool_name=tool, session_key=session_key
            ),
        )

    def unit(self, call_id: str, unit: ParsedUnit) -> None:
        self._send(
            call_id,
            unit=tool_gateway_pb2.CommandUnit(index=unit.index, text=unit.text, field=unit.field),
        )

    def close_call(self, call_id: str, full_text: str, unit_count: int) -> None:
        self._send(
            call_id, close=tool_gateway_pb2.CloseCall(full_text=full_text, unit_count=unit_count)
        )

    def cancel_call(self, call_id: str, reason: str) -> None:
        self._send(call_id, cancel=tool_gateway_pb2.CancelCall(reason=reason))

    def _send(self, call_id: str, **action) -> None:
        if call_id in self._lost:
            return  # its session is gone with the broken stream
        request = tool_gateway_pb2.ExecuteRequest(call_id=call_id, **action)
        self._journal.append(request)
        self._outbox.put_nowait(request)

    async def finish(self, wait: float) -> None:
        """Ends the stream politely: no more requests; waits for the reader."""
        self._ended = True
        self._outbox.put_nowait(_END)
        try:
            await asyncio.wait_for(asyncio.shield(self._reader), wait)
        except (TimeoutError, asyncio.CancelledError):
            pass
        self.cancel()

    def cancel(self) -> None:
        """Drops the stream: the gateway kills every tool process of the run."""
        if self._call is not None:
            self._call.cancel()
        self._reader.cancel()


def _event_from_pb(response: tool_gateway_pb2.ExecuteResponse) -> GatewayEvent:
    call_id = response.call_id
    kind = response.WhichOneof("event")
    if kind == "unit_started":
        return (call_id, response.unit_started.index)
    if kind == "unit_result":
        r = response.unit_result
        return UnitResult(
            call_id,
            r.index,
            r.ok,
            r.stdout,
            r.stderr,
            r.value,
            r.exception,
            r.duration_seconds,
            r.truncated,
        )
    if kind == "unit_progress":
        return UnitProgress(call_id, response.unit_progress.index, response.unit_progress.stdout)
    if kind == "call_result":
        r = response.call_result
        return CallOutcome(call_id, r.ok, r.output, r.units_executed, r.tool_seconds)
    if kind == "error":
        e = response.error
        code = common_pb2.ToolErrorCode.Name(e.code).removeprefix("TOOL_ERROR_CODE_")
        return CallOutcome(call_id, False, error_code=code, error_message=e.message)
    v = response.abort_verdict
    return AbortVerdict(call_id, v.reason, v.field, v.unit_index)
