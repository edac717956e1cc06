"""protobuf <-> plain types for what more than one service exchanges."""

from __future__ import annotations

import json
import math

from conveyor.v1 import common_pb2

from conveyor_common.types import FinishReason, Message, Sampling, ToolDef

_ROLE_TO_NAME = {
    common_pb2.ROLE_SYSTEM: "system",
    common_pb2.ROLE_USER: "user",
    common_pb2.ROLE_ASSISTANT: "assistant",
    common_pb2.ROLE_TOOL: "tool",
}
_NAME_TO_ROLE = {name: role for role, name in _ROLE_TO_NAME.items()}


class BadRequest(ValueError):
    """A request a client can fix; servicers turn it into INVALID_ARGUMENT."""


def message_from_pb(m: common_pb2.ChatMessage) -> Message:
    if m.role not in _ROLE_TO_NAME:
        raise BadRequest(f"message role must be set (got {m.role})")
    return Message(_ROLE_TO_NAME[m.role], m.content, m.name, m.tool_call_id)


def message_to_pb(m: Message) -> common_pb2.ChatMessage:
    return common_pb2.ChatMessage(
        role=_NAME_TO_ROLE[m.role], content=m.content, name=m.name, tool_call_id=m.tool_call_id
    )


def tool_def_from_pb(spec: common_pb2.ToolSpec) -> ToolDef:
    try:
        params = json.loads(spec.parameters_json_schema) if spec.parameters_json_schema else {}
    except json.JSONDecodeError as e:
        raise BadRequest(f"tool {spec.name!r}: parameters_json_schema is not JSON: {e}") from e
    return ToolDef(spec.name, spec.description, params)


# Bounds on sampling values, checked where requests enter (worker and
# scheduler alike), so a NaN or an absurd value is a client error rather than
# a failure inside the decode batch.
MAX_TEMPERATURE = 100.0  # far past useful: sampling is near uniform well before
MAX_TOP_K = 1 << 20  # above any vocabulary
MAX_NEW_TOKENS = 1 << 20  # the model's context cuts it further
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256


def sampling_from_pb(s: common_pb2.SamplingParams) -> Sampling:
    _check_range("temperature", s.temperature, 0, MAX_TEMPERATURE)
    _check_range("top_p", s.top_p, 0, 1)
    _check_range("top_k", s.top_k, 0, MAX_TOP_K)
    _check_range("max_new_tokens", s.max_new_tokens, 0, MAX_NEW_TOKENS)
    if len(s.stop) > MAX_STOP_STRINGS:
        raise BadRequest(f"sampling.stop: at most {MAX_STOP_STRINGS} strings, not {len(s.stop)}")
    for i, stop in enumerate(s.stop):
        if not 0 < len(stop) <= MAX_STOP_CHARS:
            raise BadRequest(
                f"sampling.stop[{i}] must be 1 to {MAX_STOP_CHARS} characters, not {len(stop)}"
            )
    return Sampling(
        temperature=s.temperature,
        top_p=s.top_p or 1.0,
        top_k=s.top_k,
        seed=s.seed if s.HasField("seed") else None,
        max_new_tokens=s.max_new_tokens,
        stop=tuple(s.stop),
    )


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if not (math.isfinite(value) and low <= value <= high):
        raise BadRequest(f"sampling.{name} must be a number in [{low}, {high}], not {value}")


def sampling_to_pb(s: Sampling) -> common_pb2.SamplingParams:
    pb = common_pb2.SamplingParams(
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        max_new_tokens=s.max_new_tokens,
        stop=list(s.stop),
    )
    if s.seed is not None:
        pb.seed = s.seed
    return pb


def finish_reason_to_pb(reason: FinishReason) -> int:
    return common_pb2.FinishReason.Value(f"FINISH_REASON_{reason.value}")


def finish_reason_from_pb(value: int) -> FinishReason:
    name = common_pb2.FinishReason.Name(value).removeprefix("FINISH_REASON_")
    return FinishReason(name) if name != "UNSPECIFIED" else FinishReason.ERROR
