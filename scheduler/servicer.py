"""gRPC edge of the scheduler: RunRequest in, RunResponse events out."""

from __future__ import annotations

import json
import re
import time
import uuid

import grpc
import structlog
from conveyor.v1 import common_pb2, conveyor_pb2, conveyor_pb2_grpc

from conveyor_common.convert import (
    BadRequest,
    finish_reason_to_pb,
    message_from_pb,
    sampling_from_pb,
)
from conveyor_common.types import Envelope, FinishReason
from scheduler import events as ev
from scheduler.config import SchedulerConfig
from scheduler.envelopes import FORMATS
from scheduler.gateway_client import GatewayClient, GatewayError, tool_to_pb
from scheduler.run import Run, RunSpec
from scheduler.tools import ToolInfo, default_envelopes, model_envelope
from scheduler.worker_client import WorkerError

log = structlog.get_logger("scheduler")

_ENVELOPES = {
    conveyor_pb2.ENVELOPE_TOOL_CALL_TAG: Envelope.TAG,
    conveyor_pb2.ENVELOPE_MARKDOWN_FENCE: Envelope.FENCE,
    conveyor_pb2.ENVELOPE_PLAN: Envelope.PLAN,
    conveyor_pb2.ENVELOPE_LLAMA3_JSON: Envelope.LLAMA3_JSON,
    conveyor_pb2.ENVELOPE_PYTHONIC: Envelope.PYTHONIC,
    conveyor_pb2.ENVELOPE_MISTRAL: Envelope.MISTRAL,
    conveyor_pb2.ENVELOPE_QWEN3_CODER: Envelope.QWEN3_CODER,
    conveyor_pb2.ENVELOPE_DEEPSEEK: Envelope.DEEPSEEK,
    conveyor_pb2.ENVELOPE_HARMONY: Envelope.HARMONY,
}
_MODES = {
    conveyor_pb2.EXECUTION_MODE_UNSPECIFIED,
    conveyor_pb2.EXECUTION_MODE_PARTIAL,
    conveyor_pb2.EXECUTION_MODE_SEQUENTIAL,
}
TOOLS_TTL_S = 30.0

# Request bounds beyond the byte cap (--max-request-bytes) and the rounds and
# retries maxima (flags): ids go into logs, metrics and downstream requests.
RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
MAX_MESSAGES = 1024
MAX_TOOL_NAMES = 256
# What a client tool may be named (OpenAI's rule for function names).
_TOOL_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class ConveyorServicer(conveyor_pb2_grpc.ConveyorServiceServicer):
    def __init__(self, config: SchedulerConfig, worker, gateway: GatewayClient):
        self.config = config
        self.worker = worker
        self.gateway = gateway
        self._tools: dict[str, ToolInfo] = {}
        self._tools_at = 0.0
        self._model: Envelope | None = None  # the worker's model's tool-call format
        self._model_at = 0.0

    async def _hosted_tools(self) -> dict[str, ToolInfo]:
        if not self._tools or time.monotonic() - self._tools_at > TOOLS_TTL_S:
            self._tools = await self.gateway.list_tools()
            self._tools_at = time.monotonic()
        return self._tools

    async def _model_envelope(self) -> Envelope | None:
        """The envelope of the format the worker says its model writes; None
        (Hermes tags and fences) when it is unknown or not built in here."""
        if not self._model_at or time.monotonic() - self._model_at > TOOLS_TTL_S:
            reported = await self.worker.tool_call_format()
            envelope = model_envelope(reported)
            if envelope is None or envelope not in FORMATS:
                log.warning(
                    "the model's tool-call format is unknown here; falling back to the tag "
                    "and fence formats",
                    reported=reported,
                )
                envelope = None
            self._model, self._model_at = envelope, time.monotonic()
        return self._model

    async def ListTools(self, request, context) -> conveyor_pb2.ListToolsResponse:
        try:
            hosted = await self._hosted_tools()
        except GatewayError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        tools = sorted(hosted.values(), key=lambda t: t.name)
        return conveyor_pb2.ListToolsResponse(tools=[tool_to_pb(t) for t in tools])

    async def Run(self, request, context):
        try:
            self._check(request)
        except BadRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        run_id = request.run_id or uuid.uuid4().hex[:16]
        structlog.contextvars.bind_contextvars(run_id=run_id)
        try:
            hosted = await self._hosted_tools()
            model = None if request.envelopes else await self._model_envelope()
        except (GatewayError, WorkerError) as e:  # the run cannot start: its one event says why
            log.warning("run failed", error=str(e))
            yield event_to_pb(ev.RunFinished(FinishReason.ERROR, str(e)), run_id, 0)
            return
        try:
            spec = self._spec(request, run_id, hosted, model, context.time_remaining())
        except BadRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        sequence = 0
        held = None  # RoundStarted(0), until the worker has taken the request
        async for event in Run(spec, self.worker, self.gateway).events():
            if isinstance(event, ev.RoundStarted) and event.round == 0:
                held = event
                continue
            if isinstance(event, ev.RunFinished) and event.rejected:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, event.message)
            for out in (held, event) if held is not None else (event,):
                yield event_to_pb(out, run_id, sequence)
                sequence += 1
            held = None
            if _client_deadline_passed(event, context):
                # Our timer and the client's race by a millisecond: the status
                # says what the event says, whichever fired first.
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, event.message)

    def _check(self, request) -> None:
        """Bounds and enum values of the request's own fields, each failure
        naming its field (sampling is checked where it is converted)."""
        if request.run_id and not RUN_ID_PATTERN.fullmatch(request.run_id):
            raise BadRequest(
                "run_id: at most 128 characters of letters, digits and ._:- "
                f"(got {len(request.run_id)} characters)"
            )
        if request.mode not in _MODES:
            raise BadRequest(f"mode: unknown ExecutionMode value {request.mode}")
        unknown = [e for e in request.envelopes if e not in _ENVELOPES]
        if unknown:
            raise BadRequest(f"envelopes: unknown or unspecified Envelope values {unknown}")
        limit = self.config.max_rounds_limit
        if request.max_rounds > limit:
            raise BadRequest(f"max_rounds: {request.max_rounds} is over this server's {limit}")
        rounds = request.max_rounds or self.config.max_rounds
        if len(request.forced_completions) > rounds:
            raise BadRequest(
                f"forced_completions: {len(request.forced_completions)} completions for "
                f"{rounds} rounds"
            )
        if request.abort_retries > self.config.max_abort_retries:
            raise BadRequest(
                f"abort_retries: {request.abort_retries} is over this server's "
                f"{self.config.max_abort_retries}"
            )
        if len(request.messages) > MAX_MESSAGES:
            raise BadRequest(f"messages: {len(request.messages)} is over {MAX_MESSAGES}")
        if len(request.tool_names) > MAX_TOOL_NAMES:
            raise BadRequest(f"tool_names: {len(request.tool_names)} is over {MAX_TOOL_NAMES}")
        if len(request.client_tools) > MAX_TOOL_NAMES:
            raise BadRequest(f"client_tools: {len(request.client_tools)} is over {MAX_TOOL_NAMES}")

    def _spec(self, request, run_id, hosted, model: Envelope | None, remaining) -> RunSpec:
        if not request.messages:
            raise BadRequest("messages must not be empty")
        unknown = [n for n in request.tool_names if n not in hosted]
        if unknown:
            raise BadRequest(f"unknown tools {unknown}; hosted: {sorted(hosted)}")
        names = list(request.tool_names) or list(hosted)
        tools = {n: hosted[n] for n in names}
        for i, spec in enumerate(request.client_tools):
            tool = _client_tool(spec, f"client_tools[{i}]")
            if tool.name in hosted or tool.name in tools:
                raise BadRequest(f"client_tools[{i}].name: {tool.name!r} is already a tool here")
            tools[tool.name] = tool
        envelopes = {_ENVELOPES[e] for e in request.envelopes if e in _ENVELOPES}
        if Envelope.PLAN in envelopes and len(envelopes) > 1:
            raise BadRequest("the plan envelope reads the whole output as a plan: use it alone")
        missing = sorted(e.value for e in envelopes - {Envelope.PLAN} if e not in FORMATS)
        if missing:
            raise BadRequest(f"envelopes: {missing} not available in this scheduler")
        return RunSpec(
            run_id=run_id,
            messages=[message_from_pb(m) for m in request.messages],
            tools=tools,
            partial=request.mode != conveyor_pb2.EXECUTION_MODE_SEQUENTIAL,
            sampling=sampling_from_pb(request.sampling),
            max_rounds=request.max_rounds or self.config.max_rounds,
            abort_retries=request.abort_retries,
            forced_completions=tuple(request.forced_completions),
            envelopes=frozenset(envelopes) or default_envelopes(tools, model),
            timeout=remaining if remaining is not None else self.config.run_timeout,
        )


def _client_deadline_passed(event, context) -> bool:
    return (
        isinstance(event, ev.RunFinished)
        and event.finish_reason is FinishReason.DEADLINE_EXCEEDED
        and context.time_remaining() is not None
    )


def _client_tool(spec: common_pb2.ToolSpec, where: str) -> ToolInfo:
    """A tool the client runs: its name, description and argument schema."""
    if not _TOOL_NAME.fullmatch(spec.name):
        raise BadRequest(f"{where}.name: {spec.name!r} is not 1-64 of [A-Za-z0-9_.-]")
    try:
        schema = json.loads(spec.parameters_json_schema) if spec.parameters_json_schema else {}
    except json.JSONDecodeError as e:
        raise BadRequest(f"{where}.parameters_json_schema: not JSON ({e})") from None
    if not isinstance(schema, dict):
        raise BadRequest(f"{where}.parameters_json_schema: must be a JSON object")
    return ToolInfo(spec.name, spec.description, schema, client=True)


def event_to_pb(event: ev.RunEvent, run_id: str, sequence: int) -> conveyor_pb2.RunResponse:
    r = conveyor_pb2.RunResponse(run_id=run_id, sequence=sequence)
    if isinstance(event, ev.TokenDelta):
        r.token_delta.CopyFrom(
            conveyor_pb2.TokenDelta(
                round=event.round, text=event.text, token_count=event.token_count
            )
        )
    elif isinstance(event, ev.RoundStarted):
        r.round_started.round = event.round
    elif isinstance(event, ev.ClientToolCallDelta):
        r.client_tool_call_delta.CopyFrom(
            conveyor_pb2.ClientToolCallDelta(
                call_id=event.call_id,
                tool_name=event.tool_name,
                arguments_delta=event.arguments_delta,
            )
        )
    elif isinstance(event, ev.ClientToolCall):
        r.client_tool_call.CopyFrom(
            conveyor_pb2.ClientToolCall(
                call_id=event.call_id,
                tool_name=event.tool_name,
                arguments_json=event.arguments_json,
                round=event.round,
            )
        )
    elif isinstance(event, ev.ToolCallStarted):
        r.tool_call_started.CopyFrom(
            conveyor_pb2.ToolCallStarted(
                call_id=event.call_id,
                tool_name=event.tool_name,
                round=event.round,
                partial_mode=common_pb2.PartialMode.Value(f"PARTIAL_MODE_{event.partial_mode}"),
            )
        )
    elif isinstance(event, ev.UnitDispatched):
        r.unit_dispatched.CopyFrom(
            conveyor_pb2.UnitDispatched(
                call_id=event.call_id,
                index=event.index,
                text=event.text,
                field=event.field,
                depends_on=list(event.depends_on),
                during_decode=event.during_decode,
            )
        )
    elif isinstance(event, ev.UnitProgress):
        r.unit_progress.call_id = event.call_id
        r.unit_progress.progress.CopyFrom(
            common_pb2.UnitProgress(index=event.index, stdout=event.stdout)
        )
    elif isinstance(event, ev.UnitResult):
        r.unit_result.call_id = event.call_id
        r.unit_result.result.CopyFrom(
            common_pb2.UnitResult(
                index=event.index,
                ok=event.ok,
                stdout=event.stdout,
                stderr=event.stderr,
                value=event.value,
                exception=event.exception,
                duration_seconds=event.duration_seconds,
                truncated=event.truncated,
            )
        )
    elif isinstance(event, ev.CallOutcome):
        r.tool_call_finished.call_id = event.call_id
        if event.error_code:
            r.tool_call_finished.error.CopyFrom(
                common_pb2.ToolError(
                    code=common_pb2.ToolErrorCode.Value(f"TOOL_ERROR_CODE_{event.error_code}"),
                    message=event.error_message,
                )
            )
        else:
            r.tool_call_finished.result.CopyFrom(
                common_pb2.CallResult(
                    ok=event.ok,
                    output=event.output,
                    units_executed=event.units_executed,
                    tool_seconds=event.tool_seconds,
                )
            )
    elif isinstance(event, ev.ParseError):
        r.parse_error.CopyFrom(
            conveyor_pb2.ParseError(call_id=event.call_id, message=event.message)
        )
    elif isinstance(event, ev.AbortVerdict):
        r.abort_verdict.call_id = event.call_id
        r.abort_verdict.verdict.CopyFrom(
            common_pb2.AbortVerdict(
                reason=event.reason, field=event.field, unit_index=event.unit_index
            )
        )
    elif isinstance(event, ev.RunFinished):
        t = event.timing
        r.run_finished.CopyFrom(
            conveyor_pb2.RunFinished(
                finish_reason=finish_reason_to_pb(event.finish_reason),
                message=event.message,
                final_text=event.final_text,
                timing=conveyor_pb2.Timing(
                    decode_seconds=t.decode_seconds,
                    tool_seconds=t.tool_seconds,
                    hidden_tool_seconds=t.hidden_tool_seconds,
                    total_seconds=t.total_seconds,
                    sequential_estimate_seconds=t.sequential_estimate_seconds,
                    units_dispatched=t.units_dispatched,
                    parse_lag_seconds=t.parse_lag_seconds,
                    rounds=t.rounds,
                    completion_tokens=t.completion_tokens,
                    prompt_tokens=t.prompt_tokens,
                ),
            )
        )
    return r
