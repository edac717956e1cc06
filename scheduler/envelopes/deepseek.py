"""DeepSeek's tool-call tokens (special tokens of the DeepSeek V3 / R1 / V3.1
tokenizers, streamed as text; note the fullwidth bar U+FF5C and the U+2581
"▁" between words, as in the models' chat templates):

- V3, V3-0324 and R1 (and the R1 distills' templates):
  `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\\n`
  "```json\\n" `{"city": "Paris"}` "\\n```" `<｜tool▁call▁end｜>` … `<｜tool▁calls▁end｜>`
  (the word before the separator is the call's type, always "function");
- V3.1 (and later): no type and no fence,
  `<｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Paris"}<｜tool▁call▁end｜>`.

Each call is CallOpened(deepseek, name, ARGUMENTS) once its name is complete
(V3: the newline after the name line; V3.1: the separator), then the JSON
arguments object's text as it streams (the fence lines left out), then
CallClosed at the object's end; what follows it up to `<｜tool▁call▁end｜>`
may be blanks and the closing fence. A call with no arguments before its end
marker calls with `{}`. The envelope ends at `<｜tool▁calls▁end｜>` (or
`<｜end▁of▁sentence｜>`, or other text where a call or the end should be,
which is plain text again). A `<｜tool▁call▁begin｜>` without the
`<｜tool▁calls▁begin｜>` before it (some outputs drop it) opens an envelope
too.

These markers are special tokens no text writes by accident: they end what
they interrupt, even inside a JSON string (a call cut short that way is
closed with what it has, and its parser reports the truncation).
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
)
from scheduler.envelopes.markers import JsonExtent, marker_at

CALLS_BEGIN = "<\uff5ctool\u2581calls\u2581begin\uff5c>"
CALLS_END = "<\uff5ctool\u2581calls\u2581end\uff5c>"
CALL_BEGIN = "<\uff5ctool\u2581call\u2581begin\uff5c>"
CALL_END = "<\uff5ctool\u2581call\u2581end\uff5c>"
SEP = "<\uff5ctool\u2581sep\uff5c>"
EOS = "<\uff5cend\u2581of\u2581sentence\uff5c>"
FENCE = "```"
MAX_NAME = 256  # characters of a call's head or name line before it is given up

_MARKERS = (CALL_END, CALLS_END, CALL_BEGIN, EOS)  # what may interrupt anything
_HEAD_MARKERS = (SEP, *_MARKERS)
_BLANK = re.compile(r"[ \t\r\n]*")
_NAME_STOP = re.compile(r"[\n{`<]")  # what ends a V3 name line
_INFO_STOP = re.compile(r"[\n{<]")  # what ends the fence's info line

# Where the region is.
_BETWEEN = "between"  # before a call, or after one's end marker
_HEAD = "head"  # after <｜tool▁call▁begin｜>: the type (V3) or the name (V3.1)
_NAME = "name"  # V3: the name line after the separator
_ARGS_START = "args_start"  # the call is open, before its arguments
_INFO = "info"  # the rest of the opening fence's line ("json")
_ARGS = "args"  # in the arguments object
_TAIL = "tail"  # the call is closed: blanks, the closing fence, its end marker


class DeepSeekRegion(Region):
    def __init__(self, marker: str):
        self._state = _HEAD if marker == CALL_BEGIN else _BETWEEN
        self._buf = ""  # held back: may begin a marker
        self._head: list[str] = []
        self._name: list[str] = []
        self._length = 0  # of the head or the name line so far
        self._extent: JsonExtent | None = None
        self._open = False  # a call is open
        self._arguments = False  # the open call's arguments began
        self._fenced = False  # the arguments sit in a fence still to close

    def feed(self, text: str) -> tuple[list[ScanEvent], str | None]:
        events: list[ScanEvent] = []
        text, self._buf = self._buf + text, ""
        i = 0
        while i < len(text):
            i, rest = _STEPS[self._state](self, text, i, events)
            if rest is not None:
                return events, rest
        return events, None

    # ---- the states: each reads text from i and returns where it stopped
    # ---- and, once the envelope ended, the text after it (else None).

    def _read_between(self, text: str, i: int, events: list[ScanEvent]) -> tuple[int, str | None]:
        i = _BLANK.match(text, i).end()
        if i == len(text):
            return i, None
        if text[i] == "<":
            found = marker_at(text, i, _MARKERS)
            if found == "":
                return self._hold(text, i)
            if found == CALL_END:  # a stray end marker
                return i + len(found), None
            if found is not None:
                return self._marker(text, i, found, events)
        return i, text[i:]  # neither a call nor the end: plain text

    def _read_head(self, text: str, i: int, events: list[ScanEvent]) -> tuple[int, str | None]:
        end = text.find("<", i)
        end = len(text) if end < 0 else end
        if self._take(self._head, text[i:end]):
            return len(text), self._give_up(events, text[end:])
        if end == len(text):
            return end, None
        found = marker_at(text, end, _HEAD_MARKERS)
        if found == "":
            return self._hold(text, end)
        if found == SEP:
            head = "".join(self._head).strip()
            if head == "function":  # V3: the type; the name line follows
                self._state, self._length = _NAME, 0
            else:  # V3.1: the name
                self._opened(head, events)
            return end + len(SEP), None
        if found is not None:
            return self._marker(text, end, found, events)
        self._take(self._head, "<")
        return end + 1, None

    def _read_name(self, text: str, i: int, events: list[ScanEvent]) -> tuple[int, str | None]:
        m = _NAME_STOP.search(text, i)
        end = m.start() if m else len(text)
        if self._take(self._name, text[i:end]):
            return len(text), self._give_up(events, text[end:])
        if m is None:
            return end, None
        ch = text[end]
        if ch == "\n":
            self._opened(self._call_name(), events)
            return end + 1, None
        if ch in "{`":  # the arguments, right after the name (or after the type)
            self._opened(self._call_name(), events)
            return end, None
        found = marker_at(text, end, _MARKERS)
        if found == "":
            return self._hold(text, end)
        if found is not None:
            return self._marker(text, end, found, events)
        self._take(self._name, "<")
        return end + 1, None

    def _read_args_start(
        self, text: str, i: int, events: list[ScanEvent]
    ) -> tuple[int, str | None]:
        i = _BLANK.match(text, i).end()
        if i == len(text):
            return i, None
        ch = text[i]
        if ch == "{":
            self._state, self._extent = _ARGS, JsonExtent(stop_in_strings=True)
            self._arguments = True
            return i, None
        if ch == "`":
            found = marker_at(text, i, (FENCE,))
            if found == "":
                return self._hold(text, i)
            if found == FENCE:
                i += len(FENCE)
                if self._fenced:  # an empty block: no arguments
                    self._fenced = False
                    self._close(events, no_arguments=True)
                    self._state = _TAIL
                else:
                    self._fenced, self._state, self._length = True, _INFO, 0
                return i, None
        elif ch == "<":
            found = marker_at(text, i, _MARKERS)
            if found == "":
                return self._hold(text, i)
            if found is not None:
                return self._marker(text, i, found, events)
        # Not an object: its parser says so, and the text is plain again.
        events.append(CallText(ch))
        self._close(events)
        return i, text[i:]

    def _read_info(self, text: str, i: int, events: list[ScanEvent]) -> tuple[int, str | None]:
        m = _INFO_STOP.search(text, i)
        end = m.start() if m else len(text)
        self._length += end - i
        if self._length > MAX_NAME:
            self._close(events)
            return len(text), text[end:]
        if m is None:
            return end, None
        ch = text[end]
        if ch == "\n":
            self._state = _ARGS_START
            return end + 1, None
        if ch == "{":
            self._state = _ARGS_START
            return end, None
        found = marker_at(text, end, _MARKERS)
        if found == "":
            return self._hold(text, end)
        if found is not None:
            return self._marker(text, end, found, events)
        return end + 1, None

    def _read_args(self, text: str, i: int, events: list[ScanEvent]) -> tuple[int, str | None]:
        j = self._extent.advance(text, i)
        if j > i:
            events.append(CallText(text[i:j]))
        if self._extent.done:
            self._extent = None
            self._close(events)
            self._state = _TAIL
            return j, None
        if j == len(text):
            return j, None
        found = marker_at(text, j, _MARKERS)  # at a "<"
        if found == "":
            return self._hold(text, j)
        if found is not None:
            return self._marker(text, j, found, events)
        events.append(CallText("<"))
        return j + 1, None

    def _read_tail(self, text: str, i: int, events: list[ScanEvent]) -> tuple[int, str | None]:
        i = _BLANK.match(text, i).end()
        if i == len(text):
            return i, None
        ch = text[i]
        if ch == "`" and self._fenced:
            found = marker_at(text, i, (FENCE,))
            if found == "":
                return self._hold(text, i)
            if found == FENCE:
                self._fenced = False
                return i + len(FENCE), None
        elif ch == "<":
            found = marker_at(text, i, _MARKERS)
            if found == "":
                return self._hold(text, i)
            if found is not None:
                return self._marker(text, i, found, events)
        return i, text[i:]  # text where the call's end should be: plain text

    # ---- helpers ---------------------------------------------------------

    def _hold(self, text: str, i: int) -> tuple[int, None]:
        self._buf = text[i:]
        return len(text), None

    def _take(self, parts: list[str], piece: str) -> bool:
        """Adds to the head or name line; True when it grew too long."""
        if piece:
            parts.append(piece)
            self._length += len(piece)
        return self._length > MAX_NAME

    def _call_name(self) -> str:
        """The V3 name line, or the head when it is empty (a V3.1 tool that
        is itself named "function")."""
        return "".join(self._name).strip() or "".join(self._head).strip()

    def _opened(self, name: str, events: list[ScanEvent]) -> None:
        events.append(CallOpened(Envelope.DEEPSEEK, name[:MAX_NAME], CallBody.ARGUMENTS))
        self._open, self._arguments, self._fenced = True, False, False
        self._head, self._name, self._length = [], [], 0
        self._state = _ARGS_START

    def _close(self, events: list[ScanEvent], no_arguments: bool = False) -> None:
        if self._open:
            if no_arguments and not self._arguments:
                events.append(CallText("{}"))
            events.append(CallClosed())
        self._open = self._arguments = False
        self._extent = None

    def _unfinished(self, events: list[ScanEvent]) -> None:
        """A call cut short before its arguments: a head or name line that is
        there opens it (its parser then reports the missing arguments)."""
        if self._state in (_HEAD, _NAME):
            name = self._call_name()
            if self._state == _HEAD and name == "function":
                name = ""
            if name:
                self._opened(name, events)

    def _give_up(self, events: list[ScanEvent], rest: str) -> str:
        """A head or name line too long for a tool's name: not a call."""
        self._head, self._name, self._length = [], [], 0
        return rest

    def _marker(
        self, text: str, i: int, found: str, events: list[ScanEvent]
    ) -> tuple[int, str | None]:
        """At one of _MARKERS: what it ends ends, and it is acted on."""
        after = i + len(found)
        # A call whose arguments were still to come has none, unless the
        # output was cut (EOS) or its name was (head or name line).
        empty = found != EOS and self._state in (_ARGS_START, _INFO)
        self._unfinished(events)
        self._close(events, no_arguments=empty)
        self._head, self._name, self._length, self._fenced = [], [], 0, False
        if found == CALL_BEGIN:
            self._state = _HEAD
            return after, None
        if found == CALL_END:
            self._state = _BETWEEN
            return after, None
        return len(text), text[after:]  # CALLS_END or EOS: the envelope ends

    def finish(self) -> list[ScanEvent]:
        events: list[ScanEvent] = []
        held, self._buf = self._buf, ""
        if held and self._state == _ARGS:  # a partial marker: text of the arguments
            events.append(CallText(held))
        elif held and self._state == _HEAD:
            self._take(self._head, held)
        elif held and self._state == _NAME:
            self._take(self._name, held)
        self._unfinished(events)
        self._close(events)
        return events


_STEPS = {
    _BETWEEN: DeepSeekRegion._read_between,
    _HEAD: DeepSeekRegion._read_head,
    _NAME: DeepSeekRegion._read_name,
    _ARGS_START: DeepSeekRegion._read_args_start,
    _INFO: DeepSeekRegion._read_info,
    _ARGS: DeepSeekRegion._read_args,
    _TAIL: DeepSeekRegion._read_tail,
}

FORMAT = EnvelopeFormat(
    name=Envelope.DEEPSEEK,
    starts=(CALLS_BEGIN, CALL_BEGIN),
    region=lambda marker, context: DeepSeekRegion(marker),
)
