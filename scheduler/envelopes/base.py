"""What every tool-call format shares: the events a scan yields, the shape
of a format (how a call starts, what reads it until it ends), and the
marker-matching helpers the formats are built from.

A format is registered under its name (see `__init__.py`). The scanner looks
for the start markers of the run's formats in plain text; from a marker on,
the format's `Region` reads the text until its envelope ends and turns it into
call events. One region may hold several calls (a JSON list of calls, a
pythonic list); each is CallOpened, CallText..., CallClosed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum


class CallBody(str, Enum):
    """What a call's text is, so the run knows which parser reads it."""

    COMMAND = "command"  # the tool's command itself (a fenced block's code)
    CALL_JSON = "call_json"  # {"name": …, "arguments": …}: the text names the tool
    ARGUMENTS = "arguments"  # the named tool's JSON arguments object


@dataclass(frozen=True)
class CallOpened:
    envelope: str  # the format's name (an Envelope value for the built-in ones)
    tool: str  # "" when the text names it (CALL_JSON)
    body: CallBody = CallBody.COMMAND


@dataclass(frozen=True)
class CallText:
    text: str


@dataclass(frozen=True)
class CallClosed:
    pass


ScanEvent = CallOpened | CallText | CallClosed


@dataclass(frozen=True)
class ScanContext:
    """What a region may need to know of the run."""

    fence_tools: dict[str, str] = field(default_factory=dict)  # fence language -> tool
    # tool -> its arguments' JSON schema (ToolInfo.parameters): formats whose
    # arguments carry no types (XML parameters) type their values by it.
    tool_schemas: dict[str, dict] = field(default_factory=dict)


class Region(ABC):
    """One envelope's text, from just after its start marker to its end."""

    @abstractmethod
    def feed(self, text: str) -> tuple[list[ScanEvent], str | None]:
        """The events `text` completes, and None while the envelope goes on,
        or the text after its end (plain text again)."""

    @abstractmethod
    def finish(self) -> list[ScanEvent]:
        """The output ended inside the envelope: an open call is closed with
        what it has (its parser then says whether that is complete)."""


@dataclass(frozen=True)
class EnvelopeFormat:
    """A tool-call format: the markers that open one of its envelopes, where
    they count, and the region that reads the envelope."""

    name: str
    starts: tuple[str, ...]
    region: Callable[[str, ScanContext], Region]  # (the marker matched, the run's context)
    at_line_start: bool = False  # a marker counts only at the start of a line
    at_output_start: bool = False  # ... only before any other non-blank output
    anywhere: tuple[str, ...] = ()  # markers (of `starts`) exempt from the two above


def partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of marker.
    Only places holding the marker's first character are tried (usually
    none), so this costs about one `find` per delta."""
    end = len(text)
    at = text.find(marker[0], max(0, end - len(marker) + 1))
    while at >= 0:
        if marker.startswith(text[at:]):
            return end - at
        at = text.find(marker[0], at + 1)
    return 0


class UntilMarker(Region):
    """A region whose text runs to an end marker: one call, opened at once,
    whose text streams as it arrives (all but the few characters that could
    still turn into the marker)."""

    def __init__(self, end: str, opened: CallOpened | None):
        self._end = end
        self._opened = opened  # None: skip the text (not a call of ours)
        self._buf = ""
        self._started = False

    def feed(self, text: str) -> tuple[list[ScanEvent], str | None]:
        events: list[ScanEvent] = []
        if not self._started:
            self._started = True
            if self._opened is not None:
                events.append(self._opened)
        buf = self._buf + text
        end = buf.find(self._end)
        if end >= 0:
            self._text(events, buf[:end])
            if self._opened is not None:
                events.append(CallClosed())
            self._buf = ""
            return events, buf[end + len(self._end) :]
        keep = partial_suffix(buf, self._end)
        self._text(events, buf[: len(buf) - keep])
        self._buf = buf[len(buf) - keep :]
        return events, None

    def _text(self, events: list[ScanEvent], text: str) -> None:
        if text and self._opened is not None:
            events.append(CallText(text))

    def finish(self) -> list[ScanEvent]:
        events: list[ScanEvent] = []
        if not self._started and self._opened is not None:
            events.append(self._opened)
        if self._opened is not None:
            self._text(events, self._buf)
            events.append(CallClosed())
        self._buf = ""
        return events
