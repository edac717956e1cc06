"""The tool developer interface: plain dataclasses, no protobuf.

A `Tool` describes itself with a `ToolSpec` and opens `ToolSession`s. The
gateway runs a call's units one after another in one session, then asks the
session for the text the model gets back. A session may serve many calls (those
sharing a session key), so it keeps its own state (an interpreter's variables)
but not the outcomes of a call: those are handed to `finish`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum

from conveyor_common.types import PartialMode  # one definition, shared with the scheduler


class ToolErrorCode(str, Enum):
    """Mirrors conveyor.v1.ToolErrorCode without the prefix."""

    UNKNOWN_TOOL = "UNKNOWN_TOOL"
    BAD_REQUEST = "BAD_REQUEST"
    TIMEOUT = "TIMEOUT"
    SANDBOX = "SANDBOX"
    CANCELLED = "CANCELLED"
    INTERNAL = "INTERNAL"


class ToolFailure(Exception):
    """A failure that ends the call (sent as a ToolError). An exception raised
    by the user's code is not one: that is a unit outcome with ok=False."""

    def __init__(self, code: ToolErrorCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str
    parameters: dict = field(default_factory=dict)  # JSON schema of the arguments object
    partial_mode: PartialMode = PartialMode.WHOLE
    partial_safe: bool = False  # may a unit run before the call is complete?
    command_field: str = ""  # the argument whose string value is the command


@dataclass(frozen=True)
class Unit:
    index: int
    text: str
    field: str = ""  # the JSON field name, for PARTIAL_MODE_JSON_FIELDS


@dataclass(frozen=True)
class Verdict:
    """A tool's word that the whole request is already doomed (an invalid
    argument, say): the gateway sends an AbortVerdict and ends the call, and
    the scheduler stops decoding instead of letting the model finish."""

    reason: str
    field: str = ""  # the argument at fault, when there is one


@dataclass(frozen=True)
class UnitOutcome:
    index: int
    ok: bool
    stdout: str = ""
    stderr: str = ""
    value: str = ""  # repr of an expression's value; empty otherwise
    exception: str = ""  # the formatted exception when ok is False
    duration_seconds: float = 0.0
    truncated: bool = False
    verdict: Verdict | None = None  # set to abort the request (ends the call)


@dataclass(frozen=True)
class CallOutcome:
    ok: bool
    output: str  # the tool message for the model
    units_executed: int
    tool_seconds: float


class ToolSession(ABC):
    """One live instance of a tool (an interpreter process, say)."""

    # Set by the gateway before each unit: where report() sends output.
    progress_sink: Callable[[int, str], None] | None = None

    def report(self, index: int, stdout: str) -> None:
        """Streams output of the running unit `index` to the client at once
        (a long unit shows progress); the unit's outcome must still carry all
        of its output."""
        if self.progress_sink is not None and stdout:
            self.progress_sink(index, stdout)

    @property
    def alive(self) -> bool:
        """False once the session can run no more units (its process died or
        was killed); the gateway then opens a fresh one for the next call."""
        return True

    @abstractmethod
    async def run_unit(self, unit: Unit) -> UnitOutcome:
        """Runs one unit. Raises ToolFailure when the tool itself fails. If the
        awaiting task is cancelled mid-unit, the work must be stopped."""

    @abstractmethod
    async def finish(self, full_text: str, outcomes: Sequence[UnitOutcome]) -> str:
        """The call is complete: returns the text given back to the model,
        built from the call's unit outcomes (whole-call tools may use full_text)."""

    @abstractmethod
    async def cancel(self) -> None:
        """Stops the work in flight at once (kills the process)."""

    @abstractmethod
    async def close(self) -> None:
        """Releases the session for good and leaves no process behind."""


class Tool(ABC):
    spec: ToolSpec
    # True: every call gets a session of its own, even calls that share a
    # session key (a tool whose session state belongs to one call).
    session_per_call: bool = False

    @abstractmethod
    async def open_session(self, session_key: str) -> ToolSession:
        """Starts a session; raises ToolFailure (SANDBOX) when it cannot."""
