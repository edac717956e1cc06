"""Hermes-style tags (Hermes, Qwen2.5, and SmolLM2 through the worker's tool
preamble): `<tool_call>{"name": …, "arguments": …}</tool_call>`, several per
message. The call's text is the JSON between the tags, which names the tool
(scheduler/parsers/tool_call_tag.py reads it, "parameters" and OpenAI's
`{"type": "function", "function": {…}}` nesting included). A tag may also
hold a JSON list of calls, `[{…}, {…}]`: each element is a call of its own,
opened as soon as its `{` arrives.
"""

from __future__ import annotations

import re

from conveyor_common.types import Envelope
from scheduler.envelopes.base import (
    CallBody,
    CallClosed,
    CallOpened,
    CallText,
    EnvelopeFormat,
    Region,
    ScanEvent,
    partial_suffix,
)

TAG_OPEN = "<tool_call>"
TAG_CLOSE = "</tool_call>"

_OPENED = CallOpened(Envelope.TAG, "", CallBody.CALL_JSON)
_BLANK = re.compile(r"[ \t\r\n]*")
_STRING_STOP = re.compile(r'["\\]')
_STRUCTURE = re.compile(r'["{}\[\],]')


class TagRegion(Region):
    def __init__(self) -> None:
        self._buf = ""  # held back: it may begin the closing tag
        self._mode = ""  # "" until the first character; "one" call or a "list"
        self._calls = _ListSplitter()

    def feed(self, text: str) -> tuple[list[ScanEvent], str | None]:
        events: list[ScanEvent] = []
        buf = self._buf + text
        end = buf.find(TAG_CLOSE)
        body, rest = (buf[:end], buf[end + len(TAG_CLOSE) :]) if end >= 0 else (buf, None)
        keep = 0 if end >= 0 else partial_suffix(body, TAG_CLOSE)
        self._buf = body[len(body) - keep :]
        self._body(body[: len(body) - keep], events)
        if rest is not None:
            events += self._close()
        return events, rest

    def finish(self) -> list[ScanEvent]:
        events: list[ScanEvent] = []
        self._body(self._buf, events)
        self._buf = ""
        return events + self._close()

    def _body(self, text: str, events: list[ScanEvent]) -> None:
        if not self._mode:
            lead = _BLANK.match(text).end()
            if lead == len(text):
                return  # blanks: the first character decides the mode
            self._mode = "list" if text[lead] == "[" else "one"
            if self._mode == "one":
                events.append(_OPENED)
            else:
                text = text[lead + 1 :]
        if self._mode == "one":
            if text:
                events.append(CallText(text))
        else:
            events += self._calls.feed(text)

    def _close(self) -> list[ScanEvent]:
        if self._mode == "one":
            return [CallClosed()]
        if self._mode == "list":
            return self._calls.finish()
        return [_OPENED, CallClosed()]  # an empty tag: its parser says what is missing


class _ListSplitter:
    """The elements of a JSON list of calls (after its `[`), each a call:
    string-aware depth tracking finds where each element ends. Text after
    the list's `]` is ignored."""

    def __init__(self) -> None:
        self._depth = 0  # inside the current element; 0 between elements
        self._in_string = False
        self._escaped = False
        self._scalar = False  # the element is not an object or list: ends at , or ]
        self._done = False  # the list's ] came

    def feed(self, text: str) -> list[ScanEvent]:
        events: list[ScanEvent] = []
        i, n = 0, len(text)
        start = None if not (self._depth or self._scalar) else 0  # the element's text in `text`
        while i < n and not self._done:
            if self._in_string:
                if self._escaped:
                    self._escaped, i = False, i + 1
                    continue
                m = _STRING_STOP.search(text, i)
                if m is None:
                    break
                i = m.end()
                if m.group() == "\\":
                    self._escaped = True
                else:
                    self._in_string = False
                continue
            if not (self._depth or self._scalar):  # between elements
                i = _BLANK.match(text, i).end()
                if i == n:
                    break
                ch = text[i]
                if ch == "]":
                    self._done = True
                    break
                if ch == ",":
                    i += 1
                    continue
                events.append(_OPENED)
                start = i
                self._scalar = ch not in "{["
                if not self._scalar:
                    self._depth, i = 1, i + 1
                continue
            m = _STRUCTURE.search(text, i)
            if m is None:
                break
            ch, i = m.group(), m.end()
            if ch == '"':
                self._in_string = True
            elif ch in "{[":
                if not self._scalar:
                    self._depth += 1
            elif self._scalar and ch in ",]":
                events += self._end(text[start : i - 1])
                start, self._done = None, ch == "]"
            elif ch in "}]" and not self._scalar:
                self._depth -= 1
                if self._depth == 0:
                    events += self._end(text[start:i])
                    start = None
        if start is not None and start < n:
            events.append(CallText(text[start:]))
        return events

    def _end(self, text: str) -> list[ScanEvent]:
        self._scalar = False
        return ([CallText(text)] if text else []) + [CallClosed()]

    def finish(self) -> list[ScanEvent]:
        """The tag or the output ended: an unfinished element is closed as
        it is (its parser reports it incomplete)."""
        if self._depth or self._scalar:
            self._depth, self._scalar = 0, False
            return [CallClosed()]
        return []


FORMAT = EnvelopeFormat(
    name=Envelope.TAG,
    starts=(TAG_OPEN,),
    region=lambda marker, context: TagRegion(),
)
