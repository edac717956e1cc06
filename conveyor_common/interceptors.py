"""Server interceptor: binds a request id to every log line of a call, and
counts calls under the standard grpc_server_* metric names."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import grpc
import structlog
from prometheus_client import Counter, Histogram

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
        request_id = _request_id(handler_call_details.invocation_metadata)
        service, method = _split(handler_call_details.method)

        def bind() -> float:
            structlog.contextvars.clear_contextvars()
            structlog.contextvars.bind_contextvars(request_id=request_id, rpc=method)
            return time.perf_counter()

        def done(start: float, context) -> None:
            code = context.code() if context.code() is not None else grpc.StatusCode.OK
            elapsed = time.perf_counter() - start
            HANDLED.labels(service, method, code.name).inc()
            HANDLING_SECONDS.labels(service, method).observe(elapsed)
            log.info("rpc done", code=code.name, seconds=round(elapsed, 4))

        return _wrap(handler, bind, done)


def _wrap(handler: grpc.RpcMethodHandler, bind: Callable, done: Callable):
    if handler.unary_unary:

        async def unary_unary(request, context):
            start = bind()
            try:
                return await handler.unary_unary(request, context)
            finally:
                done(start, context)

        return grpc.unary_unary_rpc_method_handler(
            unary_unary, handler.request_deserializer, handler.response_serializer
        )
    if handler.unary_stream:

        async def unary_stream(request, context):
            start = bind()
            try:
                async for item in handler.unary_stream(request, context):
                    yield item
            finally:
                done(start, context)

        return grpc.unary_stream_rpc_method_handler(
            unary_stream, handler.request_deserializer, handler.response_serializer
        )
    if handler.stream_stream:

        async def stream_stream(request_iterator, context):
            start = bind()
            try:
                async for item in handler.stream_stream(request_iterator, context):
                    yield item
            finally:
                done(start, context)

        return grpc.stream_stream_rpc_method_handler(
            stream_stream, handler.request_deserializer, handler.response_serializer
        )
    return handler
