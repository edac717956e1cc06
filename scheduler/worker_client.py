"""Client of LlmWorkerService: plain types in and out."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from conveyor.v1 import common_pb2, llm_worker_pb2, llm_worker_pb2_grpc

from conveyor_common.clients import Unreachable, channel, outgoing_metadata, wait_connected
from conveyor_common.convert import finish_reason_from_pb, message_to_pb, sampling_to_pb
from conveyor_common.defaults import CONNECT_TIMEOUT_S
from conveyor_common.security import ClientSecurity
from conveyor_common.types import FinishReason, Message, Sampling
from scheduler.tools import ToolInfo


@dataclass(frozen=True)
class WorkerDelta:
    text: str
    token_count: int


@dataclass(frozen=True)
class WorkerDone:
    finish_reason: FinishReason
    completion_tokens: int
    prefill_seconds: float
    decode_seconds: float
    prompt_tokens: int = 0


class WorkerError(Exception):
    """The worker failed or could not be reached; the message says how."""


class WorkerRejected(WorkerError):
    """The worker refused the request as invalid (INVALID_ARGUMENT): the
    client's to fix, e.g. a prompt longer than the model's context."""


class WorkerClient:
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
        self._stub = llm_worker_pb2_grpc.LlmWorkerServiceStub(self._channel)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Each call's: the request id, and the scheduler's token if it has one."""
        return outgoing_metadata() + self._security.metadata()

    async def generate(
        self,
        request_id: str,
        messages: list[Message],
        tools: list[ToolInfo],
        sampling: Sampling,
        forced_completion: str | None,
        timeout: float,
    ) -> AsyncIterator[WorkerDelta | WorkerDone]:
        request = llm_worker_pb2.GenerateRequest(
            request_id=request_id,
            messages=[message_to_pb(m) for m in messages],
            tools=[_tool_spec(t) for t in tools],
            sampling=sampling_to_pb(sampling),
        )
        if forced_completion is not None:
            request.forced_decoding.completion = forced_completion
        try:
            await wait_connected(
                self._channel, "llm_worker", self._target, min(self._connect_timeout, timeout)
            )
        except Unreachable as e:
            raise WorkerError(str(e)) from None
        call = self._stub.Generate(
            request, timeout=timeout, metadata=self.metadata(), wait_for_ready=True
        )
        try:
            async for response in call:
                kind = response.WhichOneof("event")
                if kind == "delta":
                    yield WorkerDelta(response.delta.text, len(response.delta.token_ids))
                elif kind == "complete":
                    c = response.complete
                    yield WorkerDone(
                        finish_reason_from_pb(c.finish_reason),
                        c.completion_tokens,
                        c.prefill_seconds,
                        c.decode_seconds,
                        c.prompt_tokens,
                    )
                    return
                else:
                    raise WorkerError(f"llm_worker failed: {response.error.message}")
            raise WorkerError("llm_worker ended the stream without a completion")
        except grpc.aio.AioRpcError as e:
            error = WorkerRejected if e.code() == grpc.StatusCode.INVALID_ARGUMENT else WorkerError
            raise error(f"llm_worker {e.code().name}: {e.details()}") from e
        finally:
            call.cancel()  # dropping the stream stops decoding at the next step

    async def tool_call_format(self, timeout: float = 10.0) -> str:
        """The tool-call format the worker's model writes ("" when unknown)."""
        return (await self.model_info(timeout)).tool_call_format

    async def model_name(self, timeout: float = 10.0) -> str:
        """The worker's model, as GetModelInfo names it."""
        return (await self.model_info(timeout)).model

    async def model_info(self, timeout: float = 10.0) -> llm_worker_pb2.GetModelInfoResponse:
        try:
            await wait_connected(
                self._channel, "llm_worker", self._target, min(self._connect_timeout, timeout)
            )
            response = await self._stub.GetModelInfo(
                llm_worker_pb2.GetModelInfoRequest(), timeout=timeout, metadata=self.metadata()
            )
        except Unreachable as e:
            raise WorkerError(str(e)) from None
        except grpc.aio.AioRpcError as e:
            raise WorkerError(f"llm_worker {e.code().name}: {e.details()}") from e
        return response

    async def abort(self, request_id: str) -> bool:
        try:
            response = await self._stub.Abort(
                llm_worker_pb2.AbortRequest(request_id=request_id),
                timeout=5,
                metadata=self.metadata(),
            )
            return response.found
        except grpc.aio.AioRpcError:
            return False

    async def close(self) -> None:
        await self._channel.close()


def _tool_spec(tool: ToolInfo) -> common_pb2.ToolSpec:
    return common_pb2.ToolSpec(
        name=tool.name,
        description=tool.description,
        parameters_json_schema=json.dumps(tool.parameters),
    )
