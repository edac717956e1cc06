"""gRPC edge of the gateway: protobuf in and out, plain data to the executor."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import grpc
import structlog
from conveyor.v1 import common_pb2, tool_gateway_pb2, tool_gateway_pb2_grpc

from conveyor_common.interceptors import MalformedRequest
from tool_gateway import messages as m
from tool_gateway.executor import StreamExecutor
from tool_gateway.registry import ToolRegistry
from tool_gateway.tools.base import ToolSpec, Unit

log = structlog.get_logger("gateway")


class ToolGatewayServicer(tool_gateway_pb2_grpc.ToolGatewayServiceServicer):
    def __init__(self, registry: ToolRegistry, call_timeout: float):
        self._registry = registry
        self._call_timeout = call_timeout
        self._streams: set[StreamExecutor] = set()
        self._closing: set[asyncio.Task] = set()

    async def ListTools(
        self, request, context
    ) -> tool_gateway_pb2.ToolGatewayServiceListToolsResponse:
        return tool_gateway_pb2.ToolGatewayServiceListToolsResponse(
            tools=[spec_to_pb(s) for s in self._registry.specs()]
        )

    async def Execute(
        self, request_iterator, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[tool_gateway_pb2.ExecuteResponse]:
        executor = StreamExecutor(self._registry, self._call_timeout)
        self._streams.add(executor)
        # The RPC may end (client cancel, deadline) while this generator is
        # parked where no CancelledError reaches it: kill the tools from here too.
        loop = asyncio.get_running_loop()
        context.add_done_callback(lambda _: _call_soon(loop, self._close, executor))
        reader = asyncio.create_task(self._read(request_iterator, executor))
        try:
            while (event := await executor.next_event()) is not None:
                yield event_to_pb(event)
            if isinstance(failure := _failure(reader), MalformedRequest):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(failure))
            if failure is not None:
                await context.abort(
                    grpc.StatusCode.INTERNAL, f"reading the requests failed: {failure!r}"
                )
        finally:
            reader.cancel()
            _failure(reader)  # retrieved, so asyncio does not warn about it
            await executor.shutdown()
            self._streams.discard(executor)

    async def _read(self, request_iterator, executor: StreamExecutor) -> None:
        """Feeds the executor; once the client is done sending, lets the
        closed calls finish, after which the response stream ends."""
        failure: Exception | None = None
        try:
            async for request in request_iterator:
                executor.submit(request_from_pb(request))
        except MalformedRequest as e:  # the client's fault: INVALID_ARGUMENT
            log.warning("malformed request", error=str(e))
            failure = e
        except Exception as e:  # ends the RPC with INTERNAL, after the closed calls
            log.warning("reading the requests failed", exc_info=True)
            failure = e
        await executor.drain()
        if failure is not None:
            raise failure

    def _close(self, executor: StreamExecutor) -> None:
        if executor not in self._streams:
            return
        task = asyncio.create_task(executor.shutdown())
        self._closing.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._closing.discard)
        task.add_done_callback(lambda _: self._streams.discard(executor))

    async def shutdown(self) -> None:
        """Kills the tools of every stream (the server is stopping)."""
        await asyncio.gather(*(e.shutdown() for e in list(self._streams)), *self._closing)
        self._streams.clear()


def _failure(task: asyncio.Task) -> BaseException | None:
    return task.exception() if task.done() and not task.cancelled() else None


def _call_soon(loop: asyncio.AbstractEventLoop, callback, *args) -> None:
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:  # the loop is closed: the server and its tools are gone
        pass


# ---- protobuf <-> plain data ----------------------------------------------


def spec_to_pb(spec: ToolSpec) -> common_pb2.ToolSpec:
    return common_pb2.ToolSpec(
        name=spec.name,
        description=spec.description,
        parameters_json_schema=json.dumps(spec.parameters),
        partial_mode=common_pb2.PartialMode.Value(f"PARTIAL_MODE_{spec.partial_mode.value}"),
        partial_safe=spec.partial_safe,
        command_field=spec.command_field,
    )


def request_from_pb(request: tool_gateway_pb2.ExecuteRequest) -> m.Request:
    call_id = request.call_id
    action = request.WhichOneof("action")
    if action == "open":
        o = request.open
        return m.OpenCall(call_id, o.tool_name, o.run_id, o.session_key, o.timeout_seconds)
    if action == "unit":
        u = request.unit
        return m.RunUnit(call_id, Unit(u.index, u.text, u.field))
    if action == "close":
        return m.CloseCall(call_id, request.close.full_text, request.close.unit_count)
    if action == "cancel":
        return m.CancelCall(call_id, request.cancel.reason)
    return m.Malformed(call_id, "the request has no action (open, unit, close or cancel)")


def event_to_pb(event: m.Event) -> tool_gateway_pb2.ExecuteResponse:
    if isinstance(event, m.UnitStarted):
        return tool_gateway_pb2.ExecuteResponse(
            call_id=event.call_id, unit_started=tool_gateway_pb2.UnitStarted(index=event.index)
        )
    if isinstance(event, m.UnitFinished):
        o = event.outcome
        return tool_gateway_pb2.ExecuteResponse(
            call_id=event.call_id,
            unit_result=common_pb2.UnitResult(
                index=o.index,
                ok=o.ok,
                stdout=o.stdout,
                stderr=o.stderr,
                value=o.value,
                exception=o.exception,
                duration_seconds=o.duration_seconds,
                truncated=o.truncated,
            ),
        )
    if isinstance(event, m.UnitProgress):
        return tool_gateway_pb2.ExecuteResponse(
            call_id=event.call_id,
            unit_progress=common_pb2.UnitProgress(index=event.index, stdout=event.stdout),
        )
    if isinstance(event, m.Aborted):
        return tool_gateway_pb2.ExecuteResponse(
            call_id=event.call_id,
            abort_verdict=common_pb2.AbortVerdict(
                reason=event.reason, field=event.field, unit_index=event.unit_index
            ),
        )
    if isinstance(event, m.CallFinished):
        o = event.outcome
        return tool_gateway_pb2.ExecuteResponse(
            call_id=event.call_id,
            call_result=common_pb2.CallResult(
                ok=o.ok,
                output=o.output,
                units_executed=o.units_executed,
                tool_seconds=o.tool_seconds,
            ),
        )
    return tool_gateway_pb2.ExecuteResponse(
        call_id=event.call_id,
        error=common_pb2.ToolError(
            code=common_pb2.ToolErrorCode.Value(f"TOOL_ERROR_CODE_{event.code.value}"),
            message=event.message,
        ),
    )
