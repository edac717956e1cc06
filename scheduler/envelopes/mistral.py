"""Mistral's `[TOOL_CALLS]` (a special token of Mistral tokenizers, streamed
as text), in the two forms mistral-common writes:

- tokenizers v2-v7 (Mistral-7B-Instruct-v0.3, Mixtral-8x22B, Mistral-Nemo,
  Mistral-Large-2407): a JSON list of calls,
  `[TOOL_CALLS] [{"name": "f", "arguments": {...}}, {"id": "…", "name": "g", …}]`;
- tokenizers v11+ (Mistral-Small-3.1/3.2, Magistral, Devstral, Ministral-3):
  one call per marker, `[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}`,
  optionally `[TOOL_CALLS]name[CALL_ID]a1b2c3d4e[ARGS]{...}`, several markers
  in a row for parallel calls.

Each call is CallOpened(mistral, name, ARGUMENTS) as soon as its name is
complete, then the arguments object's JSON text as it streams, then
CallClosed. In a list element the arguments may come before the name: they
are held and replayed once it is known; arguments written as a JSON string
(OpenAI style) stream as the decoded string, an object's text; an element
without arguments calls with `{}`. An element with no usable name (or one
that is not JSON) becomes a `call_json` call of the element's text, so the
run reports what is wrong with it.

The envelope ends at the end of the list (or of a bare `{...}` call object
written without the list), at the end of a v11 call's arguments object (then
plain text, or the next `[TOOL_CALLS]`), or at `</s>` written outside a JSON
string (inside one it is a string's text, as in HTML code). A v11 name cut
short by a newline, `</s>` or the end of the output still opens its call,
which then closes with no arguments: the run reports it as a parse error of
that call. Text of more than `MAX_NAME` characters is no name: plain text.
"""

from __future__ import annotations

import json
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
from scheduler.parsers.base import ParseFailure
from scheduler.parsers.json_stream import MAX_DEPTH, Chunk, Field, JsonObjectScanner

TOOL_CALLS = "[TOOL_CALLS]"
ARGS = "[ARGS]"
CALL_ID = "[CALL_ID]"
EOS = "</s>"
MAX_NAME = 256  # characters of a name (or call id) before it is given up

_BLANK = re.compile(r"[ \t\r\n]*")
_NAME_STOP = re.compile(r"[\[{<\n]")  # what may end a v11 name or call id


def _opened(name: str) -> CallOpened:
    return CallOpened(Envelope.MISTRAL, name, CallBody.ARGUMENTS)


class _ListCall:
    """One element of the v3 list, `{"name": …, "arguments": …, "id": …}`."""

    def __init__(self) -> None:
        # The arguments sit one level down: they may nest as deep as on their own.
        self._scanner = JsonObjectScanner(
            stream_keys=frozenset({"arguments"}), elements=False, max_depth=MAX_DEPTH, outer=1
        )
        self._raw: list[str] = []  # the element's text while no call is open
        self._held: list[str] = []  # arguments text seen before the name
        self._opened = False
        self._failed = False
        self._arguments = False  # some arguments text was seen

    def feed(self, text: str, events: list[ScanEvent]) -> None:
        if not text:
            return
        if not self._opened:
            self._raw.append(text)
        if self._failed:
            return
        try:
            found = self._scanner.feed(text)
        except ParseFailure:  # kept from an earlier piece: the scanner is done
            self._failed = True
            return
        for event in found:
            if isinstance(event, Chunk):
                self._arguments = True
                if self._opened:
                    events.append(CallText(event.text))
                else:
                    self._held.append(event.text)
            elif isinstance(event, Field) and event.key == "arguments":
                self._arguments = True
            elif isinstance(event, Field) and event.key == "name" and not self._opened:
                self._named(event.raw, events)

    def _named(self, raw: str, events: list[ScanEvent]) -> None:
        try:
            name = json.loads(raw)  # valid JSON: the scanner let it through
        except (ValueError, RecursionError):
            return
        if not isinstance(name, str) or not name.strip():
            return
        self._opened = True
        self._raw = []
        events.append(_opened(name.strip()))
        if self._held:
            events.append(CallText("".join(self._held)))
            self._held = []

    def _valid(self) -> bool:
        """The element read so far is a whole, well-formed JSON object."""
        if self._failed:
            return False
        try:
            self._scanner.finish()
        except ParseFailure:
            return False
        return True

    def end(self, events: list[ScanEvent], complete: bool) -> None:
        """The element ended (`complete`: its closing brace was read)."""
        if self._opened:
            if complete and not self._arguments and self._valid():
                events.append(CallText("{}"))  # a call without arguments
            events.append(CallClosed())
        elif self._raw:
            # No usable name: the element's text names its own (missing) tool,
            # and the tag parser says what is wrong with it.
            events.append(CallOpened(Envelope.MISTRAL, "", CallBody.CALL_JSON))
            events.append(CallText("".join(self._raw)))
            events.append(CallClosed())
        self._raw = []


# Where the region is.
_START = "start"  # right after [TOOL_CALLS]: which form?
_LIST = "list"  # in the v3 list, between elements
_ELEMENT = "element"  # in a list element (or a bare call object)
_NAME = "name"  # a v11 call's name
_CALL_ID = "call_id"  # a v11 call's [CALL_ID] id
_ARGS_START = "args_start"  # after [ARGS], before the arguments object
_ARGS = "args"  # in the v11 arguments object


class MistralRegion(Region):
    def __init__(self) -> None:
        self._state = _START
        self._buf = ""  # held back: may begin a marker
        self._bare = False  # a call object written without the list around it
        self._call: _ListCall | None = None
        self._extent: JsonExtent | None = None
        self._name: list[str] = []
        self._name_len = 0
        self._open = False  # a v11 call is open

    def feed(self, text: str) -> tuple[list[ScanEvent], str | None]:
        events: list[ScanEvent] = []
        text, self._buf = self._buf + text, ""
        i, n = 0, len(text)
        while i < n:
            i, rest = _STEPS[self._state](self, text, i, events)
            if rest is not None:
                return events, rest
        return events, None

    # ---- the states: each reads text from i and returns where it stopped
    # ---- and, once the envelope ended, the text after it (else None).

    def _read_start(self, text: str, i: int, events: list[ScanEvent]) -> tuple[int, str | None]:
        i = _BLANK.match(text, i).end()
        if i == len(text):
            return i, None
        ch = text[i]
        if ch == "[":
            found = marker_at(text, i, (TOOL_CALLS,))
            if found == "":  # "[" opens the list, or the next call's marker
                self._buf = text[i:]
                return len(text), None
            if found == TOOL_CALLS:  # an empty call: the next one starts
                return i, text[i:]
            self._state = _LIST
            return i + 1, None
        if ch == "{":
            self._bare = True
            return self._begin_element(i)
        if ch == "<":
            found = marker_at(text, i, (EOS,))
            if found is not None:
                return self._eos(text, i, found, events)
        self._state = _NAME
        return i, None

    def _read_list(self, text: str, i: int, events: list[ScanEvent]) -> tuple[int, str | None]:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i == len(text):
            return i, None
        ch = text[i]
        if ch == "{":
            return self._begin_element(i)
        if ch == "]":
            return i + 1, text[i + 1 :]
        if ch == "<":
            found = marker_at(text, i, (EOS,))
            if found is not None:
                return self._eos(text, i, found, events)
        return i, text[i:]  # not a list of calls after all: plain text

    def _begin_element(self, i: int) -> tuple[int, str | None]:
        self._state = _ELEMENT
        self._call = _ListCall()
        self._extent = JsonExtent()
        return i, None

    def _read_element(self, text: str, i: int, events: list[ScanEvent]) -> tuple[int, str | None]:
        j = self._extent.advance(text, i)
        self._call.feed(text[i:j], events)
        if self._extent.done:
            self._call.end(events, complete=True)
            self._call = self._extent = None
            if self._bare:
                return j, text[j:]
            self._state = _LIST
            return j, None
        if j < len(text):  # a "<" outside strings
            found = marker_at(text, j, (EOS,))
            if found is not None:
                return self._eos(text, j, found, events)
            self._call.feed("<", events)
            return j + 1, None
        return j, None

    def _read_name(self, text: str, i: int, events: list[ScanEvent]) -> tuple[int, str | None]:
        m = _NAME_STOP.search(text, i)
        end = m.start() if m else len(text)
        if self._take_name(text[i:end]):  # too long for a name: plain text
            self._name, self._name_len = [], 0
            return len(text), text[end:]
        if m is None:
            return end, None
        ch = text[end]
        if ch == "{":
            self._named(events)
            self._begin_arguments()
            return end, None
        if ch == "\n":
            return end, self._unnamed(events, text[end:])
        found = marker_at(text, end, (ARGS, CALL_ID, EOS))
        if found == "":
            self._buf = text[end:]
            return len(text), None
        if found == ARGS:
            self._named(events)
            self._state = _ARGS_START
            return end + len(ARGS), None
        if found == CALL_ID:
            self._named(events)
            self._state = _CALL_ID
            self._name, self._name_len = [], 0
            return end + len(CALL_ID), None
        if found == EOS:
            return end, self._unnamed(events, text[end + len(EOS) :])
        self._take_name(ch)  # a "[" or "<" of the name itself
        return end + 1, None

    def _read_call_id(self, text: str, i: int, events: list[ScanEvent]) -> tuple[int, str | None]:
        m = _NAME_STOP.search(text, i)
        end = m.start() if m else len(text)
        if self._take_name(text[i:end]):
            return len(text), self._close(events, text[end:])
        if m is None:
            return end, None
        ch = text[end]
        if ch == "{":
            self._begin_arguments()
            return end, None
        if ch == "\n":
            return end, self._close(events, text[end:])
        found = marker_at(text, end, (ARGS, EOS))
        if found == "":
            self._buf = text[end:]
            return len(text), None
        if found == ARGS:
            self._state = _ARGS_START
            return end + len(ARGS), None
        if found == EOS:
            return end, self._close(events, text[end + len(EOS) :])
        self._take_name(ch)
        return end + 1, None

    def _read_args_start(
        self, text: str, i: int, events: list[ScanEvent]
    ) -> tuple[int, str | None]:
        i = _BLANK.match(text, i).end()
        if i == len(text):
            return i, None
        if text[i] == "{":
            self._begin_arguments()
            return i, None
        if text[i] == "<":
            found = marker_at(text, i, (EOS,))
            if found is not None:
                return self._eos(text, i, found, events)
        # Not an object: its parser says so; the text goes on as plain text.
        events.append(CallText(text[i]))
        return i, self._close(events, text[i:])

    def _begin_arguments(self) -> None:
        self._state = _ARGS
        self._extent = JsonExtent()

    def _read_args(self, text: str, i: int, events: list[ScanEvent]) -> tuple[int, str | None]:
        j = self._extent.advance(text, i)
        if j > i:
            events.append(CallText(text[i:j]))
        if self._extent.done:
            self._extent = None
            return j, self._close(events, text[j:])
        if j < len(text):  # a "<" outside strings
            found = marker_at(text, j, (EOS,))
            if found is not None:
                return self._eos(text, j, found, events)
            events.append(CallText("<"))
            return j + 1, None
        return j, None

    # ---- helpers ---------------------------------------------------------

    def _eos(
        self, text: str, i: int, found: str, events: list[ScanEvent]
    ) -> tuple[int, str | None]:
        """At a `<` that is `</s>` (found) or may become it (""): the end."""
        if found == "":
            self._buf = text[i:]
            return len(text), None
        self._end_call(events)
        return len(text), text[i + len(EOS) :]

    def _take_name(self, piece: str) -> bool:
        """Adds to the name or call id; True when it grew too long."""
        if piece:
            self._name.append(piece)
            self._name_len += len(piece)
        return self._name_len > MAX_NAME

    def _named(self, events: list[ScanEvent]) -> None:
        events.append(_opened("".join(self._name).strip()))
        self._open = True
        self._name, self._name_len = [], 0

    def _unnamed(self, events: list[ScanEvent], rest: str) -> str:
        """The name ended before its arguments: a call that will fail, then
        plain text (or nothing at all for a blank name)."""
        if "".join(self._name).strip():
            self._named(events)
        return self._close(events, rest)

    def _close(self, events: list[ScanEvent], rest: str) -> str:
        if self._open:
            events.append(CallClosed())
            self._open = False
        return rest

    def _end_call(self, events: list[ScanEvent]) -> None:
        """The envelope ends where it is: an open call closes with what it has."""
        if self._state == _ELEMENT:
            self._call.end(events, complete=False)
            self._call = None
        elif self._state == _NAME:
            self._unnamed(events, "")
        else:
            self._close(events, "")
        self._state = _START

    def finish(self) -> list[ScanEvent]:
        events: list[ScanEvent] = []
        held, self._buf = self._buf, ""
        if held:  # a partial marker: it is text of whatever it is in
            if self._state == _ELEMENT:
                self._call.feed(held, events)
            elif self._state == _ARGS:
                events.append(CallText(held))
            elif self._state == _NAME:
                self._take_name(held)
        self._end_call(events)
        return events


_STEPS = {
    _START: MistralRegion._read_start,
    _LIST: MistralRegion._read_list,
    _ELEMENT: MistralRegion._read_element,
    _NAME: MistralRegion._read_name,
    _CALL_ID: MistralRegion._read_call_id,
    _ARGS_START: MistralRegion._read_args_start,
    _ARGS: MistralRegion._read_args,
}

FORMAT = EnvelopeFormat(
    name=Envelope.MISTRAL,
    starts=(TOOL_CALLS,),
    region=lambda marker, context: MistralRegion(),
)
