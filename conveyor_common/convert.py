"""protobuf <-> plain types for what more than one service exchanges."""

from __future__ import annotations

import json

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


def sampling_from_pb(s: common_pb2.SamplingParams) -> Sampling:
    if s.temperature < 0 or not 0 <= s.top_p <= 1 or s.top_k < 0 or s.max_new_tokens < 0:
        raise BadRequest(
            "sampling: temperature and top_k must be >= 0, top_p in [0, 1], max_new_tokens >= 0"
        )
    return Sampling(
        temperature=s.temperature,
        top_p=s.top_p or 1.0,
        top_k=s.top_k,
        seed=s.seed if s.HasField("seed") else None,
        max_new_tokens=s.max_new_tokens,
        stop=tuple(s.stop),
    )


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
