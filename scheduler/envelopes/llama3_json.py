"""Llama 3.1 / 3.2 / 3.3 JSON tool calls (Meta's "JSON based tool calling";
vLLM's and SGLang's `llama3_json` parser):

    {"name": "get_weather", "parameters": {"city": "Paris"}}
    <|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"x": 1}}

Where an envelope starts: a `{` that is the first non-blank character of the
output, or the `<|python_tag|>` special token (streamed as text), also only
before any other output: the scanner has one placement rule per format, so
the tag after some text (which Meta's template allows) waits for a per-marker
rule there (`EnvelopeFormat` naming the markers that count anywhere). A
bare `{` is a call only if its object's first key is "name", "parameters" or
"arguments": a model that answers with some other JSON object writes plain
text. After the tag any object is a call, and anything but `{` is plain text
(Llama 3.1's built-in tools write `<|python_tag|>brave_search.call(...)`).

Each call is one JSON object: "name" names the tool, "parameters" (or its
synonym "arguments", whichever comes first) holds its arguments, an object
(or, as OpenAI writes it, a JSON-encoded string of one). The call opens the
moment the name's string closes: CallOpened(LLAMA3_JSON, name, ARGUMENTS);
the arguments' raw text streams as CallText as it arrives (held and replayed
when written before the name) and the call closes as soon as both its name
and its arguments are complete. An object with a name and no arguments is a
call with `{}`. Other keys are read, checked as JSON, and ignored (a
malformed tail after a complete call does not undo the call; the rest of
its object is skipped by bracket count).

Several calls are separated by `;` (blanks around it allowed). The envelope
ends after a call at the first text that is not blanks and one `;` followed
by another `{`: that text (blanks and `;` included) is plain text again. The
special tokens `<|eom_id|>` and `<|eot_id|>`, when they come as text, end
the envelope wherever they are (an open call closes with what it has).

Malformed or cut calls never raise: a named call closes with the text it has
(its arguments' text up to the bad character) and the tool's arguments
parser reports the ParseError. A call that fails
before its name is known (malformed JSON, no "name", a name that is not a
non-empty string) is handed over whole, once its object ends (by bracket
count), as a CALL_JSON call: the tag parser that reads those reports what is
wrong with it, and nothing runs.
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
from scheduler.envelopes.markers import JsonExtent, MarkerSet
from scheduler.parsers.base import ParseFailure
from scheduler.parsers.json_stream import MAX_DEPTH, Chunk, End, Field, JsonObjectScanner

PYTHON_TAG = "<|python_tag|>"
END_MARKERS = ("<|eom_id|>", "<|eot_id|>")
_ENDS = MarkerSet(END_MARKERS)
ARGUMENT_KEYS = ("parameters", "arguments")
CALL_KEYS = frozenset({"name", *ARGUMENT_KEYS})  # a bare object is a call if its first key is one

_BLANKS = " \t\r\n"
_OUTSIDE = re.compile(r'["{}\[\]]')  # what moves the bracket count outside strings
_INSIDE = re.compile(r'["\\]')  # what ends a run of string characters


class _FirstKey:
    """Decides, from a bare object's first characters, whether it is a call:
    True / False once known, None while its first key is still being written."""

    __slots__ = ("_in_key", "_escape", "_parts")

    def __init__(self) -> None:
        self._in_key = False
        self._escape = False
        self._parts: list[str] = []

    def decide(self, text: str) -> bool | None:
        i, n = 0, len(text)
        if not self._in_key:
            while i < n and text[i] in _BLANKS:
                i += 1
            if i == n:
                return None
            if text[i] != '"':
                return False  # "{}", "{1", ...: not a call's object
            self._in_key, i = True, i + 1
        start = i
        while i < n:
            if self._escape:
                self._escape, i = False, i + 1
                continue
            m = _INSIDE.search(text, i)
            if m is None:
                break
            if m.group() == "\\":
                self._escape, i = True, m.end()
                continue
            self._parts.append(text[start : m.start()])
            try:
                key = json.loads('"' + "".join(self._parts) + '"')
            except ValueError:
                return False
            return key in CALL_KEYS
        self._parts.append(text[start:])
        return None


def _failed(scanner: JsonObjectScanner) -> bool:
    """Whether the scanner keeps a failure (its next feed would raise it)."""
    return scanner.failure is not None


class _JsonCall:
    """One call's JSON object, fed from just after its opening brace."""

    def __init__(self, bare: bool):
        # Fed from just after the opening brace; markers are the region's job.
        self._object_end = JsonExtent(stop_at_markers=False, depth=1)
        self._first_key = _FirstKey() if bare else None  # None: known to be a call
        # The arguments sit one level down: they may nest as deep as on their own.
        self._scanner = JsonObjectScanner(
            stream_keys=frozenset(ARGUMENT_KEYS), elements=False, max_depth=MAX_DEPTH, outer=1
        )
        if not bare:
            self._scanner.feed("{")  # the brace the region read
        self._raw: list[str] | None = ["{"]  # the object's text while no call is open
        self._held: list[str] = []  # arguments text written before the name
        self._args_key: str | None = None
        self._args_done = False
        self._named = False  # CallOpened was emitted
        self._open = False  # ... and CallClosed not yet
        self._dead = False  # the JSON failed: the rest only looks for the object's end
        self.not_a_call: str | None = None  # a bare object that is plain text: its text

    def feed(self, text: str, i: int, events: list[ScanEvent]) -> int:
        """Reads text[i:]; returns the index just after the object's end, or
        -1 when all of it was read and the object goes on. A bare object that
        turns out not to be a call sets `not_a_call` to the text read so far
        (all of text[i:] but what the returned index leaves)."""
        end = self._object_end.advance(text, i)
        end = end if self._object_end.done else -1
        segment = text[i:] if end < 0 else text[i:end]
        if self._raw is not None:
            self._raw.append(segment)
        if self._first_key is not None:
            decided = self._first_key.decide(segment)
            if decided is None:
                return -1
            self._first_key = None
            if not decided:
                self.not_a_call = "".join(self._raw)
                return end
            segment = "".join(self._raw)  # the scanner has seen none of it yet
        if not self._dead:
            self._scan(segment, events)
        if end >= 0:
            self._ended(events)
        return end

    def _scan(self, segment: str, events: list[ScanEvent]) -> None:
        try:
            found = self._scanner.feed(segment)
            failed = _failed(self._scanner)
        except ParseFailure:  # a scanner that raises at once
            found, failed = [], True
        for event in found:
            if isinstance(event, Chunk):
                if self._args_key is None and event.key in ARGUMENT_KEYS:
                    self._args_key = event.key
                if event.key == self._args_key and not self._args_done:
                    self._arguments(event.text, events)
            elif isinstance(event, Field):
                if event.key == "name" and not self._named:
                    self._name(event.raw, events)
                elif event.key in ARGUMENT_KEYS and self._args_key in (None, event.key):
                    self._args_key, self._args_done = event.key, True
                    if self._open:
                        self._close(events)
            elif isinstance(event, End) and self._open:
                self._arguments("{}", events)  # a name and no arguments
                self._close(events)
            if self._dead:
                break
        if failed:
            self._dead = True
            if self._open:
                self._close(events)  # its arguments parser says what is missing

    def _name(self, raw: str, events: list[ScanEvent]) -> None:
        try:
            name = json.loads(raw)  # valid JSON: the scanner let it through
        except (ValueError, RecursionError):
            name = None
        if not isinstance(name, str) or not name:
            self._dead = True  # handed over whole at the object's end
            return
        self._named = self._open = True
        self._raw = None
        events.append(CallOpened(Envelope.LLAMA3_JSON, name, CallBody.ARGUMENTS))
        held, self._held = "".join(self._held), []
        if held:
            events.append(CallText(held))
        if self._args_done:
            self._close(events)

    def _arguments(self, text: str, events: list[ScanEvent]) -> None:
        if self._named:
            events.append(CallText(text))
        else:
            self._held.append(text)

    def _close(self, events: list[ScanEvent]) -> None:
        self._open = False
        events.append(CallClosed())

    def _ended(self, events: list[ScanEvent]) -> None:
        """The object's text ended (or the output did, or an end token came)."""
        if self._open:
            self._close(events)
        elif not self._named and self._raw is not None:
            # No call could be opened: the tag parser reads the whole object
            # and says what is wrong with it (no tool runs).
            events.append(CallOpened(Envelope.LLAMA3_JSON, "", CallBody.CALL_JSON))
            events.append(CallText("".join(self._raw)))
            events.append(CallClosed())
            self._raw = None

    def cut(self, events: list[ScanEvent]) -> str | None:
        """The output or the envelope ended inside the object. A bare object
        still undecided is plain text: its text is returned."""
        if self._first_key is not None:
            return "".join(self._raw)
        if not self._named and not self._dead:
            self._dead = True
        self._ended(events)
        return None


# Region states
_BEFORE = "before"  # after the tag, before the first call's "{"
_CALL = "call"
_AFTER = "after"  # after a call: blanks, one ";", then "{" for another call


class Llama3JsonRegion(Region):
    def __init__(self, marker: str):
        self._held = ""  # the end of the text that may begin an end token
        self._gap = ""  # blanks (and a ";") not yet known to be the envelope's
        self._semicolon = False
        if marker == PYTHON_TAG:
            self._state, self._call = _BEFORE, None
        else:  # the bare "{" the scanner matched
            self._state, self._call = _CALL, _JsonCall(bare=True)

    def feed(self, text: str) -> tuple[list[ScanEvent], str | None]:
        events: list[ScanEvent] = []
        buf = self._held + text
        at, token = _ENDS.earliest(buf)
        if at >= 0:
            body, tail = buf[:at], buf[at:]
            self._held = ""
        else:
            keep = _ENDS.held(buf)
            body, tail = buf[: len(buf) - keep], ""
            self._held = buf[len(buf) - keep :]
        rest = self._read(body, events)
        if rest is not None:  # the envelope ended before any end token
            rest += tail or self._held
            self._held = ""
            return events, rest
        if at < 0:
            return events, None
        # An end token ends the envelope (an open call closes with what it has).
        plain = self._call.cut(events) if self._state == _CALL else None
        after = buf[at + len(token) :]
        return events, after if plain is None else plain + buf[at:]

    def _read(self, text: str, events: list[ScanEvent]) -> str | None:
        """Reads text; returns None while the envelope goes on, or the plain
        text after its end."""
        i, n = 0, len(text)
        while i < n:
            if self._state == _CALL:
                end = self._call.feed(text, i, events)
                if self._call.not_a_call is not None:
                    return self._call.not_a_call + (text[end:] if end >= 0 else "")
                if end < 0:
                    return None
                self._state, self._call, i = _AFTER, None, end
                continue
            ch = text[i]
            if ch in _BLANKS:
                self._gap += ch
            elif ch == "{" and (self._state == _BEFORE or self._semicolon):
                self._gap, self._semicolon = "", False
                self._state, self._call = _CALL, _JsonCall(bare=False)
            elif ch == ";" and self._state == _AFTER and not self._semicolon:
                self._gap += ch
                self._semicolon = True
            else:  # not another call: plain text from here, the gap included
                rest, self._gap = self._gap + text[i:], ""
                return rest
            i += 1
        return None

    def finish(self) -> list[ScanEvent]:
        events: list[ScanEvent] = []
        if self._held:
            self._read(self._held, events)
            self._held = ""
        if self._state == _CALL and self._call is not None:
            self._call.cut(events)
        self._call, self._state = None, _AFTER
        return events


FORMAT = EnvelopeFormat(
    name=Envelope.LLAMA3_JSON,
    starts=("{", PYTHON_TAG),
    region=lambda marker, context: Llama3JsonRegion(marker),
    at_output_start=True,  # a bare call is the whole reply
    anywhere=(PYTHON_TAG,),  # the tag marks a call wherever it comes
)

__all__ = ["END_MARKERS", "FORMAT", "PYTHON_TAG", "Llama3JsonRegion"]
