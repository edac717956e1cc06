"""The run's events as plain data; the servicer turns them into RunResponse."""

from __future__ import annotations

from dataclasses import dataclass, field

from conveyor_common.types import FinishReason, PartialMode


@dataclass(frozen=True)
class RoundStarted:
    round: int


@dataclass(frozen=True)
class TokenDelta:
    round: int
    text: str
    token_count: int


@dataclass(frozen=True)
class ToolCallStarted:
    call_id: str
    tool_name: str
    round: int
    partial_mode: PartialMode


@dataclass(frozen=True)
class UnitDispatched:
    call_id: str
    index: int
    text: str
    field: str = ""
    during_decode: bool = False
    depends_on: tuple[int, ...] = ()


@dataclass(frozen=True)
class UnitResult:
    call_id: str
    index: int
    ok: bool
    stdout: str = ""
    stderr: str = ""
    value: str = ""
    exception: str = ""
    duration_seconds: float = 0.0
    truncated: bool = False


@dataclass(frozen=True)
class UnitProgress:
    """Output of a unit still running (its UnitResult repeats it)."""

    call_id: str
    index: int
    stdout: str


@dataclass(frozen=True)
class CallOutcome:
    """A call's end: a result (ok or not), or an error (error_code set)."""

    call_id: str
    ok: bool
    output: str = ""
    units_executed: int = 0
    tool_seconds: float = 0.0
    error_code: str = ""  # a ToolErrorCode name without prefix, when the call failed
    error_message: str = ""


@dataclass(frozen=True)
class ParseError:
    call_id: str
    message: str


@dataclass(frozen=True)
class AbortVerdict:
    call_id: str
    reason: str
    field: str = ""
    unit_index: int = 0


@dataclass(frozen=True)
class Timing:
    decode_seconds: float = 0.0
    tool_seconds: float = 0.0
    hidden_tool_seconds: float = 0.0
    total_seconds: float = 0.0
    sequential_estimate_seconds: float = 0.0
    units_dispatched: int = 0
    parse_lag_seconds: float = 0.0
    rounds: int = 0
    completion_tokens: int = 0
    prompt_tokens: int = 0  # summed over rounds, each round's whole prompt


@dataclass(frozen=True)
class RunFinished:
    finish_reason: FinishReason
    message: str = ""
    final_text: str = ""
    timing: Timing = field(default_factory=Timing)
    # The worker refused the request as invalid before any output (a prompt
    # over the context): the client gets INVALID_ARGUMENT, not this event.
    rejected: bool = False


@dataclass(frozen=True)
class ClientToolCall:
    """A complete call of a tool the client runs."""

    call_id: str
    tool_name: str
    arguments_json: str
    round: int


@dataclass(frozen=True)
class ClientToolCallDelta:
    """More of a client tool call's arguments text, as the model writes it."""

    call_id: str
    tool_name: str
    arguments_delta: str


RunEvent = (
    RoundStarted
    | TokenDelta
    | ToolCallStarted
    | UnitDispatched
    | UnitResult
    | UnitProgress
    | CallOutcome
    | ParseError
    | AbortVerdict
    | ClientToolCall
    | ClientToolCallDelta
    | RunFinished
)
