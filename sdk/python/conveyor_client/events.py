"""A run's events as plain, typed values (the stream's `RunResponse`s)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from conveyor_client._proto.v1 import common_pb2, conveyor_pb2


@dataclass(frozen=True)
class Token:
    text: str
    round: int


@dataclass(frozen=True)
class RoundStarted:
    round: int


@dataclass(frozen=True)
class ToolCallStarted:
    call_id: str
    tool: str
    round: int


@dataclass(frozen=True)
class UnitDispatched:
    call_id: str
    index: int
    text: str
    during_decode: bool  # sent while the model was still writing the call


@dataclass(frozen=True)
class UnitResult:
    call_id: str
    index: int
    ok: bool
    stdout: str
    value: str
    exception: str
    seconds: float


@dataclass(frozen=True)
class CallFinished:
    call_id: str
    ok: bool
    output: str  # what the model reads; the error's message when the call failed
    error: str = ""  # the tool error's code, when it failed


@dataclass(frozen=True)
class ClientToolCall:
    """The model called a tool the client runs: run it, answer in the next run."""

    call_id: str
    tool: str
    arguments: dict


@dataclass(frozen=True)
class Finished:
    reason: str  # STOP, LENGTH, MAX_ROUNDS, TOOL_CALLS, ERROR, ...
    message: str
    final_text: str
    timing: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Other:
    """Any other event (progress, parse errors, verdicts), as its message."""

    kind: str
    message: object


Event = (
    Token
    | RoundStarted
    | ToolCallStarted
    | UnitDispatched
    | UnitResult
    | CallFinished
    | ClientToolCall
    | Finished
    | Other
)


def from_pb(r: conveyor_pb2.RunResponse) -> Event:
    kind = r.WhichOneof("event")
    if kind == "token_delta":
        return Token(r.token_delta.text, r.token_delta.round)
    if kind == "round_started":
        return RoundStarted(r.round_started.round)
    if kind == "tool_call_started":
        c = r.tool_call_started
        return ToolCallStarted(c.call_id, c.tool_name, c.round)
    if kind == "unit_dispatched":
        u = r.unit_dispatched
        return UnitDispatched(u.call_id, u.index, u.text, u.during_decode)
    if kind == "unit_result":
        res = r.unit_result.result
        return UnitResult(
            r.unit_result.call_id,
            res.index,
            res.ok,
            res.stdout,
            res.value,
            res.exception,
            res.duration_seconds,
        )
    if kind == "tool_call_finished":
        f = r.tool_call_finished
        if f.WhichOneof("outcome") == "error":
            code = common_pb2.ToolErrorCode.Name(f.error.code).removeprefix("TOOL_ERROR_CODE_")
            return CallFinished(f.call_id, False, f.error.message, code)
        return CallFinished(f.call_id, f.result.ok, f.result.output)
    if kind == "client_tool_call":
        c = r.client_tool_call
        try:
            arguments = json.loads(c.arguments_json or "{}")
        except json.JSONDecodeError:
            arguments = {"_raw": c.arguments_json}
        return ClientToolCall(c.call_id, c.tool_name, arguments)
    if kind == "run_finished":
        f = r.run_finished
        t = f.timing
        timing = {name.name: getattr(t, name.name) for name in t.DESCRIPTOR.fields}
        reason = common_pb2.FinishReason.Name(f.finish_reason).removeprefix("FINISH_REASON_")
        return Finished(reason, f.message, f.final_text, timing)
    return Other(kind or "", getattr(r, kind) if kind else None)
