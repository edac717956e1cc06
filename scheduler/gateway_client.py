"""Client of ToolGatewayService: the tool list, and one Execute stream per run."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

import grpc
from conveyor.v1 import common_pb2, tool_gateway_pb2, tool_gateway_pb2_grpc

from conveyor_common.clients import channel, outgoing_metadata
from scheduler.events import AbortVerdict, CallOutcome, UnitProgress, UnitResult
from scheduler.parsers import ParsedUnit
from scheduler.tools import ToolInfo

_END = object()


class GatewayError(Exception):
    """The gateway failed or could not be reached."""


def _mode_name(value: int) -> str:
    name = common_pb2.PartialMode.Name(value).removeprefix("PARTIAL_MODE_")
    return "WHOLE" if name == "UNSPECIFIED" else name


def tool_from_pb(spec: common_pb2.ToolSpec) -> ToolInfo:
    return ToolInfo(
        name=spec.name,
        description=spec.description,
        parameters=json.loads(spec.parameters_json_schema) if spec.parameters_json_schema else {},
        partial_mode=_mode_name(spec.partial_mode),
        partial_safe=spec.partial_safe,
        command_field=spec.command_field,
    )


# Events the stream hands to the run: a unit started (call_id, index), a unit
# result, a call outcome, an abort verdict; or the stream's failure.
GatewayEvent = tuple[str, int] | UnitResult | UnitProgress | CallOutcome | AbortVerdict


class GatewayClient:
    def __init__(self, target: str):
        self._channel = channel(target)
        self._stub = tool_gateway_pb2_grpc.ToolGatewayServiceStub(self._channel)

    async def list_tools(self, timeout: float = 10.0) -> dict[str, ToolInfo]:
        try:
            response = await self._stub.ListTools(
                tool_gateway_pb2.ListToolsRequest(),
                timeout=timeout,
                metadata=outgoing_metadata(),
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
        return ExecuteStream(self._stub, run_id, timeout, on_event, on_failure)

    async def close(self) -> None:
        await self._channel.close()


class ExecuteStream:
    """The run's Execute stream. Sends never block (an unbounded outbox: the
    units of one run are few and small); a task reads the gateway's events."""

    def __init__(self, stub, run_id, timeout, on_event, on_failure):
        self._run_id = run_id
        self._outbox: asyncio.Queue = asyncio.Queue()
        self._on_event = on_event
        self._on_failure = on_failure
        self._call = stub.Execute(self._requests(), timeout=timeout, metadata=outgoing_metadata())
        self._reader = asyncio.create_task(self._read())

    async def _requests(self):
        while True:
            item = await self._outbox.get()
            if item is _END:
                return
            yield item

    async def _read(self) -> None:
        try:
            async for response in self._call:
                await self._on_event(_event_from_pb(response))
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                await self._on_failure(f"tool_gateway {e.code().name}: {e.details()}")
        except asyncio.CancelledError:
            raise

    def open(self, call_id: str, tool: str, session_key: str) -> None:
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
        self._outbox.put_nowait(tool_gateway_pb2.ExecuteRequest(call_id=call_id, **action))

    async def finish(self, wait: float) -> None:
        """Ends the stream politely: no more requests; waits for the reader."""
        self._outbox.put_nowait(_END)
        try:
            await asyncio.wait_for(asyncio.shield(self._reader), wait)
        except (TimeoutError, asyncio.CancelledError):
            pass
        self.cancel()

    def cancel(self) -> None:
        """Drops the stream: the gateway kills every tool process of the run."""
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
        code = tool_gateway_pb2.ToolErrorCode.Name(e.code).removeprefix("TOOL_ERROR_CODE_")
        return CallOutcome(call_id, False, error_code=code, error_message=e.message)
    v = response.abort_verdict
    return AbortVerdict(call_id, v.reason, v.field, v.unit_index)
