"""An incremental scanner for one JSON object, fed in pieces, each piece once.

It reports what partial execution needs as soon as the text shows it:
- `Field(key, raw)`: a top-level field's value is complete (raw JSON text);
- `Element(key, i, raw)`: element i of a top-level array field is complete;
- `Chunk(key, text, is_string)`: for keys asked to stream, the value as it
  arrives: a string's decoded characters (escapes, surrogate pairs and
  escapes split across pieces included), or the raw text of any other value;
- `End()`: the object closed.

Malformed JSON (RFC 8259, plus two limits: no key twice among the top-level
fields, no nesting deeper than `MAX_DEPTH`) is a ParseFailure with the offset
and what was expected, deferred as UnitParser says: the feed() that meets the
error returns the events before it (a streamed value's text up to the bad
character included) and the next feed() or finish() raises. Every value the
scanner lets through is valid JSON that `json.loads` reads without trouble.

Runs of string characters are skipped with one regex search, so the cost per
piece is proportional to the piece (plus a constant), never to the prefix.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from scheduler.parsers.base import ParseFailure

# The deepest nesting of objects and arrays a scanned object may have, itself
# included: far more than any tool's arguments need, and far under what
# `json.loads` (the tool's reader) and Python's recursion limit can take.
MAX_DEPTH = 64


@dataclass(frozen=True, slots=True)
class Field:
    key: str
    raw: str


@dataclass(frozen=True, slots=True)
class Element:
    key: str
    index: int
    raw: str


@dataclass(frozen=True, slots=True)
class Chunk:
    key: str
    text: str
    is_string: bool


@dataclass(frozen=True, slots=True)
class End:
    pass


JsonEvent = Field | Element | Chunk | End

# A string's run ends at its quote, an escape, or a raw control character
# (U+0000-U+001F), which RFC 8259 forbids unescaped.
_STRING_STOP = re.compile(r'["\\\x00-\x1f]')
_WHITESPACE = re.compile(r"[ \t\n\r]*")
_SCALAR = re.compile(r"[-+0-9.eEa-z]*")
_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}

# What the innermost container expects next.
_KEY = "key"  # a key or (right after "{", or never after ",") the end
_COLON = "colon"
_VALUE = "value"
_AFTER = "after"  # "," or the container's end
_START = "start"  # before the root "{"
_DONE = "done"  # after the root "}"


class _Capture:
    """Raw text of one open value, collected piece by piece (each char once)."""

    __slots__ = ("parts", "start")

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.start: int | None = None  # index in the current piece; None: closed

    def open(self, i: int) -> None:
        self.parts, self.start = [], i

    def close(self, text: str, end: int) -> str:
        raw = "".join(self.parts) + text[self.start : end]
        self.parts, self.start = [], None
        return raw

    def carry(self, text: str) -> str:
        """End of a piece: keeps the rest of it; returns what was kept."""
        piece = text[self.start :]
        self.parts.append(piece)
        self.start = 0
        return piece


class JsonObjectScanner:
    def __init__(
        self,
        stream_keys: frozenset[str] = frozenset(),
        elements: bool = True,
        max_depth: int = MAX_DEPTH,
        outer: int = 0,
    ):
        """`max_depth` bounds the nesting below the `outer` levels (the tool
        call's own object around its arguments: 1)."""
        self._stream_keys = stream_keys
        self._elements = elements
        self._max_depth = max_depth + outer
        self._nesting_message = f"nested deeper than {max_depth} objects and arrays"
        self.failure: str | None = None  # kept: the next feed() or finish() raises it
        self._fail_at = 0  # where in the piece the kept failure is
        self._keys: set[str] = set()  # the top-level keys seen
        self._stack: list[str] = []  # "{" / "["
        self._expect = _START
        self._after_comma = False  # a member must follow (no trailing comma)
        self._offset = 0  # characters consumed before this piece, for messages
        # string state
        self._in_string = False
        self._is_key = False
        self._decode = False
        self._escape = ""  # "", "\\", or "\\u" plus the hex digits seen so far
        self._high_surrogate = 0
        self._key_chars: list[str] = []
        self._scalar: list[str] | None = None
        # the top-level field being written
        self._key = ""
        self._streaming = False  # this field's key streams
        self._field = _Capture()
        self._element = _Capture()
        self._element_index = 0

    # ---- public ----------------------------------------------------------

    @property
    def done(self) -> bool:
        return self._expect == _DONE

    def feed(self, text: str) -> list[JsonEvent]:
        if self.failure is not None:
            raise ParseFailure(self.failure)
        events: list[JsonEvent] = []
        try:
            i, n = 0, len(text)
            while i < n:
                if self._in_string:
                    i = self._string_run(text, i, events)
                    continue
                ch = text[i]
                if self._scalar is not None:
                    if ch in " \t\n\r,}]":
                        self._end_scalar(text, i, events)
                    else:
                        end = _SCALAR.match(text, i).end()
                        if end == i:
                            self._fail(f"unexpected {ch!r} in a literal", i)
                        self._scalar.append(text[i:end])
                        i = end
                        continue
                if ch in " \t\n\r":
                    i = _WHITESPACE.match(text, i).end()
                    continue
                i = self._structural(ch, text, i, events)
            if self._field.start is not None:
                piece = self._field.carry(text)
                if self._streaming and not self._string_value and piece:
                    events.append(Chunk(self._key, piece, False))
            if self._element.start is not None:
                self._element.carry(text)
            self._offset += n
        except ParseFailure as e:
            self.failure = str(e)
            field = self._field.start
            if field is not None and self._streaming and not self._string_value:
                if self._fail_at > field:  # the streamed value's text before the error
                    events.append(Chunk(self._key, text[field : self._fail_at], False))
        return events

    def finish(self) -> None:
        """Raises ParseFailure unless the object is complete."""
        if self.failure is not None:
            raise ParseFailure(self.failure)
        if self._expect != _DONE:
            where = "inside a string" if self._in_string else "before the object closed"
            try:
                self._fail(f"the text ended {where}")
            except ParseFailure as e:
                self.failure = str(e)
                raise

    # ---- structure -------------------------------------------------------

    def _structural(self, ch: str, text: str, i: int, events: list[JsonEvent]) -> int:
        expect = self._expect
        if expect == _VALUE:
            if ch == "]" and self._stack[-1] == "[" and not self._after_comma:
                return self._close(ch, text, i, events)  # an empty array
            self._value_begins(i, string=ch == '"')
            if ch == '"':
                self._start_string(is_key=False)
            elif ch in "{[":
                self._open(ch, i)
            elif ch in "}]," or ch == ":":
                self._fail(f"expected a value, got {ch!r}", i)
            else:
                self._scalar = []
                return i  # the literal's characters are read by feed
            return i + 1
        if expect == _KEY:
            if ch == '"':
                self._start_string(is_key=True)
                return i + 1
            if ch == "}" and not self._after_comma:
                return self._close(ch, text, i, events)
            self._fail(f"expected a key in double quotes, got {ch!r}", i)
        if expect == _AFTER:
            if ch == ",":
                self._expect = _KEY if self._stack[-1] == "{" else _VALUE
                self._after_comma = True
                return i + 1
            if ch in "}]":
                return self._close(ch, text, i, events)
            self._fail(f"expected ',' or the end of the container, got {ch!r}", i)
        if expect == _COLON:
            if ch != ":":
                self._fail(f"expected ':' after a key, got {ch!r}", i)
            self._expect = _VALUE
            return i + 1
        if expect == _START:
            if ch != "{":
                self._fail(f"expected '{{' to open the object, got {ch!r}", i)
            self._open("{", i)
            return i + 1
        self._fail(f"unexpected {ch!r} after the end of the object", i)

    def _open(self, opener: str, i: int) -> None:
        if len(self._stack) >= self._max_depth:
            self._fail(self._nesting_message, i)
        self._stack.append(opener)
        self._expect = _KEY if opener == "{" else _VALUE
        self._after_comma = False

    def _close(self, closer: str, text: str, i: int, events: list[JsonEvent]) -> int:
        if self._stack[-1] != ("{" if closer == "}" else "["):
            self._fail(f"{closer!r} does not close {self._stack[-1]!r}", i)
        self._stack.pop()
        if not self._stack:
            self._expect = _DONE
            events.append(End())
            return i + 1
        self._value_ends(text, i + 1, events)
        return i + 1

    def _end_scalar(self, text: str, i: int, events: list[JsonEvent]) -> None:
        literal = "".join(self._scalar)
        self._scalar = None
        try:
            json.loads(literal)
        except ValueError:
            self._fail(f"invalid literal {literal[:40]!r}", i)
        self._value_ends(text, i, events)

    # ---- values at depth 1 (fields) and 2 (array elements) ---------------

    _string_value = False

    def _value_begins(self, i: int, string: bool) -> None:
        depth = len(self._stack)
        self._after_comma = False
        if depth == 1:
            self._field.open(i)
            self._streaming = self._key in self._stream_keys
            self._string_value = string
        elif depth == 2 and self._elements and self._stack[1] == "[":
            self._element.open(i)

    def _value_ends(self, text: str, end: int, events: list[JsonEvent]) -> None:
        """A value closed just before `end`, inside the container now innermost."""
        depth = len(self._stack)
        self._expect = _AFTER
        if depth == 1:
            start = self._field.start
            if self._streaming and not self._string_value and end > start:
                events.append(Chunk(self._key, text[start:end], False))
            events.append(Field(self._key, self._field.close(text, end)))
        elif depth == 2 and self._element.start is not None:
            events.append(Element(self._key, self._element_index, self._element.close(text, end)))
            self._element_index += 1

    # ---- strings ---------------------------------------------------------

    def _start_string(self, is_key: bool) -> None:
        self._in_string = True
        self._is_key = is_key
        depth1 = len(self._stack) == 1
        self._decode = depth1 and (is_key or self._streaming)
        self._key_chars = []

    def _string_run(self, text: str, i: int, events: list[JsonEvent]) -> int:
        """Consumes string characters from i; returns where it stopped."""
        if self._escape:
            return self._escape_step(text, i, events)
        match = _STRING_STOP.search(text, i)
        end = match.start() if match else len(text)
        if end > i and self._decode:
            self._emit_chars(text[i:end], events)
        if match is None:
            return end
        stop = text[end]
        if stop == "\\":
            self._escape = "\\"
            return end + 1
        if stop != '"':
            what = "key" if self._is_key else "string"
            self._fail(
                f"raw control character U+{ord(stop):04X} inside a {what} (JSON needs it escaped)",
                end,
            )
        self._in_string = False  # the closing quote
        if self._high_surrogate:  # a high surrogate with no low one after it
            self._high_surrogate = 0
            self._emit_chars("\ufffd", events)
        if self._is_key:
            if len(self._stack) == 1:
                self._key = "".join(self._key_chars)
                if self._key in self._keys:
                    self._fail(f"duplicate key {self._key!r}", end)
                self._keys.add(self._key)
                self._element_index = 0
            self._expect = _COLON
            self._after_comma = False
        else:
            self._value_ends(text, end + 1, events)
        return end + 1

    def _escape_step(self, text: str, i: int, events: list[JsonEvent]) -> int:
        ch = text[i]
        if self._escape == "\\":
            if ch == "u":
                self._escape = "\\u"
                return i + 1
            if ch not in _ESCAPES:
                self._fail(f"invalid escape '\\{ch}'", i)
            self._escape = ""
            if self._decode:
                self._emit_chars(_ESCAPES[ch], events)
            return i + 1
        if ch not in "0123456789abcdefABCDEF":
            self._fail(f"invalid \\u escape near {ch!r}", i)
        self._escape += ch
        if len(self._escape) < 6:
            return i + 1
        code = int(self._escape[2:], 16)
        self._escape = ""
        if not self._decode:
            return i + 1
        if 0xD800 <= code < 0xDC00:
            if self._high_surrogate:
                self._emit_chars("", events)  # flushes the earlier lone one
            self._high_surrogate = code
            return i + 1
        if 0xDC00 <= code < 0xE000:
            if not self._high_surrogate:
                self._emit_chars("\ufffd", events)
                return i + 1
            code = 0x10000 + ((self._high_surrogate - 0xD800) << 10) + (code - 0xDC00)
            self._high_surrogate = 0
        self._emit_chars(chr(code), events)
        return i + 1

    def _emit_chars(self, chars: str, events: list[JsonEvent]) -> None:
        if self._high_surrogate:  # a high surrogate not followed by \\u low
            chars = "\ufffd" + chars
            self._high_surrogate = 0
        if not chars:
            return
        if self._is_key:
            self._key_chars.append(chars)
        else:
            events.append(Chunk(self._key, chars, True))

    def _fail(self, message: str, i: int = 0) -> None:
        self._fail_at = i
        raise ParseFailure(f"malformed JSON at character {self._offset + i}: {message}")
