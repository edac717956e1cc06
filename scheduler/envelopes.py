"""Finds tool calls in the model's streamed output.

Envelopes recognised:
- markdown fences: a line "```python" (or another language a tool claims)
  opens a call, a line starting "```" closes it; the call's text is the body.
- tags: `<tool_call>{"name": ..., "arguments": ...}</tool_call>`, several per
  message; the call's text is the JSON between the tags.

The scanner holds back only the few characters that could still turn into a
marker, so body text reaches the unit parser in the same delta it arrived in
(a statement's newline is never delayed waiting for a possible fence).
"""

from __future__ import annotations

from dataclasses import dataclass

from conveyor_common.types import Envelope

FENCE = "```"
TAG_OPEN = "<tool_call>"
TAG_CLOSE = "</tool_call>"


@dataclass(frozen=True)
class CallOpened:
    envelope: Envelope
    tool: str  # for fences, the tool claiming the language; for tags, "" (in the JSON)


@dataclass(frozen=True)
class CallText:
    text: str


@dataclass(frozen=True)
class CallClosed:
    pass


ScanEvent = CallOpened | CallText | CallClosed


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of marker."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


class EnvelopeScanner:
    def __init__(self, fence_tools: dict[str, str], tags: bool = True, fences: bool = True):
        """fence_tools maps a fence language ("python") to the tool that runs it."""
        self._fence_tools = {k.lower(): v for k, v in fence_tools.items()}
        self._tags = tags
        self._fences = fences
        self._buf = ""
        self._state = "text"  # text | info | fence | other_fence | tag
        self._line_start = True  # the next char of _buf starts a line

    def feed(self, text: str) -> list[ScanEvent]:
        self._buf += text
        events: list[ScanEvent] = []
        while self._advance(events):
            pass
        return events

    def finish(self) -> list[ScanEvent]:
        """End of output: an open call is closed with what it has."""
        events: list[ScanEvent] = []
        if self._state in ("fence", "tag"):
            if self._buf:
                events.append(CallText(self._buf))
            events.append(CallClosed())
        self._buf = ""
        self._state = "text"
        return events

    @property
    def in_call(self) -> bool:
        return self._state in ("fence", "tag")

    # One step of the state machine; True when it made progress.
    def _advance(self, events: list[ScanEvent]) -> bool:
        buf = self._buf
        if not buf:
            return False
        if self._state == "text":
            return self._scan_text(buf, events)
        if self._state == "info":
            newline = buf.find("\n")
            if newline < 0:
                return False
            language = buf[:newline].strip().lower()
            self._buf, self._line_start = buf[newline + 1 :], True
            tool = self._fence_tools.get(language)
            if tool:
                self._state = "fence"
                events.append(CallOpened(Envelope.FENCE, tool))
            else:
                self._state = "other_fence"
            return True
        if self._state in ("fence", "other_fence"):
            return self._scan_fence_body(buf, events)
        return self._scan_tag_body(buf, events)

    def _scan_text(self, buf: str, events: list[ScanEvent]) -> bool:
        """Skips plain text up to the next marker."""
        candidates = []
        if self._tags:
            i = buf.find(TAG_OPEN)
            if i >= 0:
                candidates.append((i, "tag"))
        if self._fences:
            i = self._fence_at_line_start(buf)
            if i >= 0:
                candidates.append((i, "fence"))
        if candidates:
            i, kind = min(candidates)
            if kind == "tag":
                self._buf, self._state = buf[i + len(TAG_OPEN) :], "tag"
                events.append(CallOpened(Envelope.TAG, ""))
            else:
                self._buf, self._state = buf[i + len(FENCE) :], "info"
            return True
        keep = max(
            _partial_suffix(buf, TAG_OPEN) if self._tags else 0,
            self._partial_fence(buf) if self._fences else 0,
        )
        consumed = buf[: len(buf) - keep]
        if consumed:
            self._line_start = consumed.endswith("\n")
        self._buf = buf[len(buf) - keep :]
        return False

    def _fence_at_line_start(self, buf: str) -> int:
        if self._line_start and buf.startswith(FENCE):
            return 0
        i = buf.find("\n" + FENCE)
        return i + 1 if i >= 0 else -1

    def _partial_fence(self, buf: str) -> int:
        """Chars at the end of buf that may begin a fence at a line start."""
        for n in (2, 1):
            if buf.endswith(FENCE[:n]):
                before = buf[: len(buf) - n]
                if (before == "" and self._line_start) or before.endswith("\n"):
                    return n
        return 0

    def _scan_fence_body(self, buf: str, events: list[ScanEvent]) -> bool:
        end = self._fence_at_line_start(buf)
        inside = self._state == "fence"
        if end >= 0:
            if inside and end:
                events.append(CallText(buf[:end]))
            if inside:
                events.append(CallClosed())
            # The rest of the closing fence's line is plain text.
            self._buf, self._state, self._line_start = buf[end + len(FENCE) :], "text", False
            return True
        keep = self._partial_fence(buf)
        body = buf[: len(buf) - keep]
        if body:
            if inside:
                events.append(CallText(body))
            self._line_start = body.endswith("\n")
        self._buf = buf[len(buf) - keep :]
        return False

    def _scan_tag_body(self, buf: str, events: list[ScanEvent]) -> bool:
        end = buf.find(TAG_CLOSE)
        if end >= 0:
            if end:
                events.append(CallText(buf[:end]))
            events.append(CallClosed())
            self._buf, self._state = buf[end + len(TAG_CLOSE) :], "text"
            self._line_start = False
            return True
        keep = _partial_suffix(buf, TAG_CLOSE)
        if len(buf) > keep:
            events.append(CallText(buf[: len(buf) - keep]))
        self._buf = buf[len(buf) - keep :]
        return False
