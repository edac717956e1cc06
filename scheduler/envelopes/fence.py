"""Markdown fences: a line "```python" (or another language a tool claims)
opens a call, a line starting "```" closes it; the call's text is the block's
body, the tool's command. A fence of a language no tool claims is skipped
to its end, so its body is never taken for a call."""

from __future__ import annotations

from conveyor_common.types import Envelope
from scheduler.envelopes.base import (
    CallBody,
    CallClosed,
    CallOpened,
    CallText,
    EnvelopeFormat,
    Region,
    ScanContext,
    ScanEvent,
)

FENCE = "```"


class FenceRegion(Region):
    def __init__(self, context: ScanContext):
        self._tools = {k.lower(): v for k, v in context.fence_tools.items()}
        self._buf = ""
        self._tool: str | None = None  # None until the info line is read; "" not ours
        self._line_start = False  # the next character of _buf starts a line

    def feed(self, text: str) -> tuple[list[ScanEvent], str | None]:
        events: list[ScanEvent] = []
        buf = self._buf + text
        if self._tool is None:
            newline = buf.find("\n")
            if newline < 0:
                self._buf = buf
                return events, None
            self._tool = self._tools.get(buf[:newline].strip().lower(), "")
            if self._tool:
                events.append(CallOpened(Envelope.FENCE, self._tool, CallBody.COMMAND))
            buf, self._line_start = buf[newline + 1 :], True
        end = self._fence_at_line_start(buf)
        if end >= 0:
            self._text(events, buf[:end])
            if self._tool:
                events.append(CallClosed())
            self._buf = ""
            return events, buf[end + len(FENCE) :]  # the rest of that line is plain text
        keep = self._partial_fence(buf)
        body = buf[: len(buf) - keep]
        if body:
            self._text(events, body)
            self._line_start = body.endswith("\n")
        self._buf = buf[len(buf) - keep :]
        return events, None

    def _text(self, events: list[ScanEvent], text: str) -> None:
        if text and self._tool:
            events.append(CallText(text))

    def _fence_at_line_start(self, buf: str) -> int:
        if self._line_start and buf.startswith(FENCE):
            return 0
        i = buf.find("\n" + FENCE)
        return i + 1 if i >= 0 else -1

    def _partial_fence(self, buf: str) -> int:
        """Characters at the end of buf that may begin a fence at a line start."""
        for n in (2, 1):
            if buf.endswith(FENCE[:n]):
                before = buf[: len(buf) - n]
                if (before == "" and self._line_start) or before.endswith("\n"):
                    return n
        return 0

    def finish(self) -> list[ScanEvent]:
        events: list[ScanEvent] = []
        if self._tool:  # an unfinished info line opened no call
            self._text(events, self._buf)
            events.append(CallClosed())
        self._buf = ""
        return events


FORMAT = EnvelopeFormat(
    name=Envelope.FENCE,
    starts=(FENCE,),
    region=lambda marker, context: FenceRegion(context),
    at_line_start=True,
)
