"""Server interceptor: binds a request id to every log line of a call,
counts calls under the standard grpc_server_* metric names with their real
status (a client cancel is CANCELLED, a passed deadline DEADLINE_EXCEEDED),
turns a request that is not valid protobuf into INVALID_ARGUMENT instead
of grpc's UNKNOWN, and opens the call's server span (its parent from the
caller's trace-context metadata; see conveyor_common/tracing.py)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

import grpc
import structlog
from opentelemetry import context as otel_context
from opentelemetry import trace
from prometheus_client import Counter, Histogram

from conveyor_common import tracing

REQUEST_ID_KEY = "x-request-id"

HANDLED = Counter(
    "grpc_server_handled_total",
    "RPCs completed on the server, regardless of success or failure.",
    ["grpc_service", "grpc_method", "grpc_code"],
)
HANDLING_SECONDS = Histogram(
    "grpc_server_handling_seconds",
    "Response latency of RPCs handled by the server.",
    ["grpc_service", "grpc_method"],
    buckets=(0.005, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)

log = structlog.get_logger("rpc")


def _request_id(metadata) -> str:
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY:
            return value
    return uuid.uuid4().hex[:16]


class MalformedRequest(ValueError):
    """A request message that does not parse as its protobuf type. Unary
    handlers never see one (the call ends INVALID_ARGUMENT); a streaming
    handler's request iterator raises this, for the handler to end the call
    with INVALID_ARGUMENT."""


class _Unparsed:
    """What the deserializer hands on in place of a message it cannot parse."""

    def __init__(self, error: Exception):
        self.message = f"the request is not a valid protobuf message: {error}"


def _tolerant(deserializer: Callable | None) -> Callable | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes):
        try:
            return deserializer(data)
        except Exception as e:  # DecodeError, and whatever a custom type raises
            return _Unparsed(e)

    return deserialize


async def _checked(request_iterator):
    async for request in request_iterator:
        if isinstance(request, _Unparsed):
            raise MalformedRequest(request.message)
        yield request


def status_of(context, error: BaseException | None) -> grpc.StatusCode:
    """The status a call really ended with. `context.code()` is None unless
    the handler set one, so a cancelled or timed-out call would count as OK."""
    if context.code() is not None:
        return context.code()
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return grpc.StatusCode.DEADLINE_EXCEEDED  # whatever the handler did after it
    # A streaming handler left at a `yield` is closed (GeneratorExit), not cancelled.
    if context.cancelled() or isinstance(error, asyncio.CancelledError | GeneratorExit):
        return grpc.StatusCode.CANCELLED
    if error is not None:
        return grpc.StatusCode.UNKNOWN
    return grpc.StatusCode.OK


class _Started:
    __slots__ = ("at", "span", "token")

    def __init__(self, at: float, span, token):
        self.at, self.span, self.token = at, span, token


def _split(method: str) -> tuple[str, str]:
    _, service, name = method.split("/", 2)
    return service, name


class RequestContextInterceptor(grpc.aio.ServerInterceptor):
    """Wraps each handler so the request id is bound inside the handler's own
    task (binding it in intercept_service would not reach the handler)."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith("/grpc."):
            return handler
        metadata = handler_call_details.invocation_metadata
        request_id = _request_id(metadata)
        service, method = _split(handler_call_details.method)

        def bind() -> _Started:
            structlog.contextvars.clear_contextvars()
            structlog.contextvars.bind_contextvars(request_id=request_id, rpc=method)
            span = tracing.tracer().start_span(
                f"{service}/{method}",
                context=tracing.extract(metadata),
                kind=trace.SpanKind.SERVER,
                attributes={
                    "rpc.system": "grpc",
                    "rpc.service": service,
                    "rpc.method": method,
                    tracing.SERVICE_ATTRIBUTE: service,
                    "conveyor.request_id": request_id,
                },
            )
            token = otel_context.attach(trace.set_span_in_context(span))
            return _Started(time.perf_counter(), span, token)

        def done(started: _Started, context, error: BaseException | None) -> None:
            code = status_of(context, error)
            elapsed = time.perf_counter() - started.at
            HANDLED.labels(service, method, code.name).inc()
            HANDLING_SECONDS.labels(service, method).observe(elapsed)
            log.info("rpc done", code=code.name, seconds=round(elapsed, 4))
            started.span.set_attribute("rpc.grpc.status_code", code.value[0])
            if code != grpc.StatusCode.OK:
                started.span.set_status(trace.StatusCode.ERROR, code.name)
            started.span.end()
            # A stream abandoned at a `yield` (client cancel) is closed later
            # in another task's context, where the token does not apply
            # (otel's detach would log a traceback for it).
            try:
                started.token.var.reset(started.token)
            except ValueError:
                pass

        return _wrap(handler, bind, done)


def _wrap(handler: grpc.RpcMethodHandler, bind: Callable, done: Callable):
    deserializer = _tolerant(handler.request_deserializer)
    if handler.unary_unary:

        async def unary_unary(request, context):
            start, error = bind(), None
            try:
                if isinstance(request, _Unparsed):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
                return await handler.unary_unary(request, context)
            except BaseException as e:
                error = e
                raise
            finally:
                done(start, context, error)

        return grpc.unary_unary_rpc_method_handler(
            unary_unary, deserializer, handler.response_serializer
        )
    if handler.unary_stream:

        async def unary_stream(request, context):
            start, error = bind(), None
            try:
                if isinstance(request, _Unparsed):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
                async for item in handler.unary_stream(request, context):
                    yield item
            except BaseException as e:
                error = e
                raise
            finally:
                done(start, context, error)

        return grpc.unary_stream_rpc_method_handler(
            unary_stream, deserializer, handler.response_serializer
        )
    if handler.stream_stream:

        async def stream_stream(request_iterator, context):
            start, error = bind(), None
            try:
                async for item in handler.stream_stream(_checked(request_iterator), context):
                    yield item
            except BaseException as e:
                error = e
                raise
            finally:
                done(start, context, error)

        return grpc.stream_stream_rpc_method_handler(
            stream_stream, deserializer, handler.response_serializer
        )
    return handler
