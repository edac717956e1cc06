"""What the servicer hands the executor, and what the executor emits, as
plain data (the servicer converts to and from protobuf)."""

from __future__ import annotations

from dataclasses import dataclass

from tool_gateway.tools.base import CallOutcome, ToolErrorCode, Unit, UnitOutcome


@dataclass(frozen=True)
class OpenCall:
    call_id: str
    tool_name: str
    run_id: str = ""
    session_key: str = ""
    timeout_seconds: float = 0.0  # 0: the gateway's default


@dataclass(frozen=True)
class RunUnit:
    call_id: str
    unit: Unit


@dataclass(frozen=True)
class CloseCall:
    call_id: str
    full_text: str = ""
    unit_count: int = 0


@dataclass(frozen=True)
class CancelCall:
    call_id: str
    reason: str = ""


@dataclass(frozen=True)
class Malformed:
    """A request without an action."""

    call_id: str
    problem: str


Request = OpenCall | RunUnit | CloseCall | CancelCall | Malformed


@dataclass(frozen=True)
class UnitStarted:
    call_id: str
    index: int


@dataclass(frozen=True)
class UnitFinished:
    call_id: str
    outcome: UnitOutcome


@dataclass(frozen=True)
class CallFinished:
    call_id: str
    outcome: CallOutcome


@dataclass(frozen=True)
class CallFailed:
    call_id: str
    code: ToolErrorCode
    message: str


@dataclass(frozen=True)
class UnitProgress:
    call_id: str
    index: int
    stdout: str


@dataclass(frozen=True)
class Aborted:
    """A unit's verdict that the request is doomed; the call ends next."""

    call_id: str
    unit_index: int
    reason: str
    field: str = ""


Event = UnitStarted | UnitProgress | UnitFinished | Aborted | CallFinished | CallFailed
