"""gRPC edge of the worker: protobuf in, plain types to the engine, protobuf out."""

from __future__ import annotations

import uuid

import grpc
import structlog
from conveyor.v1 import llm_worker_pb2, llm_worker_pb2_grpc
from opentelemetry import trace

from conveyor_common.convert import (
    BadRequest,
    finish_reason_to_pb,
    message_from_pb,
    sampling_from_pb,
    tool_def_from_pb,
)
from llm_worker.engines import (
    Completion,
    Engine,
    EngineUnavailable,
    GenerationRequest,
    RequestError,
)

log = structlog.get_logger("worker")

# The largest GenerateRequest taken, in serialized bytes: far more than any
# model's context holds, and refused before a second is spent tokenizing it.
# Twice the scheduler's own request cap, so the tool results a run adds to a
# conversation the scheduler took never push a later round over it.
MAX_REQUEST_BYTES = 8 * 1024 * 1024


def request_from_pb(req: llm_worker_pb2.GenerateRequest) -> GenerationRequest:
    return GenerationRequest(
        request_id=req.request_id or uuid.uuid4().hex,
        messages=[message_from_pb(m) for m in req.messages],
        tools=[tool_def_from_pb(t) for t in req.tools],
        sampling=sampling_from_pb(req.sampling),
        forced_completion=req.forced_decoding.completion
        if req.HasField("forced_decoding")
        else None,
    )


def completion_to_pb(c: Completion) -> llm_worker_pb2.GenerateComplete:
    return llm_worker_pb2.GenerateComplete(
        finish_reason=finish_reason_to_pb(c.finish_reason),
        prompt_tokens=c.prompt_tokens,
        completion_tokens=c.completion_tokens,
        queue_seconds=c.queue_seconds,
        prefill_seconds=c.prefill_seconds,
        decode_seconds=c.decode_seconds,
        cached_prompt_tokens=c.cached_prompt_tokens,
        prefill_seconds_saved=c.prefill_seconds_saved,
    )


class LlmWorkerServicer(llm_worker_pb2_grpc.LlmWorkerServiceServicer):
    def __init__(self, engine: Engine | None = None, max_request_bytes: int = MAX_REQUEST_BYTES):
        self.engine = engine  # None while the model loads
        self.max_request_bytes = max_request_bytes

    async def Generate(self, request, context):
        if self.engine is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading")
        size = request.ByteSize()
        if size > self.max_request_bytes:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"request is {size} bytes; this worker takes at most {self.max_request_bytes}",
            )
        try:
            gen_request = request_from_pb(request)
        except BadRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        request_id = gen_request.request_id
        structlog.contextvars.bind_contextvars(generation=request_id)
        try:
            async for item in self.engine.generate(gen_request):
                if isinstance(item, Completion):
                    if item.message:
                        yield llm_worker_pb2.GenerateResponse(
                            request_id=request_id,
                            error=llm_worker_pb2.GenerateError(message=item.message),
                        )
                        log.warning("generation failed", message=item.message)
                        return
                    # On the Generate server span (conveyor_common/interceptors.py).
                    trace.get_current_span().set_attributes(
                        {
                            "conveyor.generation": request_id,
                            "conveyor.finish_reason": item.finish_reason.value,
                            "gen_ai.usage.input_tokens": item.prompt_tokens,
                            "gen_ai.usage.output_tokens": item.completion_tokens,
                            "conveyor.cached_prompt_tokens": item.cached_prompt_tokens,
                            "conveyor.queue_seconds": item.queue_seconds,
                            "conveyor.prefill_seconds": item.prefill_seconds,
                            "conveyor.decode_seconds": item.decode_seconds,
                        }
                    )
                    log.info(
                        "generation done",
                        finish=item.finish_reason.value,
                        tokens=item.completion_tokens,
                        prefill_s=round(item.prefill_seconds, 3),
                        decode_s=round(item.decode_seconds, 3),
                        cached_tokens=item.cached_prompt_tokens,
                    )
                    yield llm_worker_pb2.GenerateResponse(
                        request_id=request_id, complete=completion_to_pb(item)
                    )
                else:
                    yield llm_worker_pb2.GenerateResponse(
                        request_id=request_id,
                        delta=llm_worker_pb2.GenerateDelta(
                            text=item.text, token_ids=item.token_ids
                        ),
                    )
        except RequestError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except EngineUnavailable as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))

    async def Abort(self, request, context):
        found = self.engine.abort(request.request_id) if self.engine else False
        return llm_worker_pb2.AbortResponse(found=found)

    async def GetModelInfo(self, request, context):
        if self.engine is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading")
        info = self.engine.info
        return llm_worker_pb2.GetModelInfoResponse(
            model=info.model,
            device=info.device,
            dtype=info.dtype,
            max_context_tokens=info.max_context,
            tool_call_format=info.tool_call_format,
            engine=info.engine,
        )
