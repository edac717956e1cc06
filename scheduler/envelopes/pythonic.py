"""Pythonic tool calls (Llama 3.2 / 3.3 zero-shot function calling, Llama 4;
vLLM's `pythonic` and `llama4_pythonic` parsers): a Python list of calls with
keyword arguments, the whole reply,

    [get_weather(city="San Francisco", metric="celsius"), f(x=1, ys=[1, 2])]
    <|python_start|>[get_weather(city="Paris")]<|python_end|>

Where an envelope starts: a `[` that is the first non-blank character of the
output, or Llama 4's `<|python_start|>` (streamed as text) there, followed by
the `[`; `<|python_end|>` right after the list (blanks between allowed) ends
it too. A bare `[` is a call list only if its first element starts as one,
`name(` (a Python identifier, dots allowed): `[1, 2]` or `[a link](…)` is
plain text. The envelope ends after the list's `]`, or at the first element
that is not a call (the text from there is plain again).

Each call opens as soon as `name(` is complete: CallOpened(PYTHONIC, name,
ARGUMENTS). Its keyword arguments are transcoded, as they arrive, into the
text of a JSON object, `city="Paris", n=2)` -> `{"city": "Paris", "n": 2}`,
so each argument is a unit of the tool's JSON arguments parser, and a string
argument (the python tool's code) streams character by character. Python
literals: strings ('…', "…", '''…''', \"\"\"…\"\"\", r/u prefixes, every escape,
adjacent strings concatenated; a raw newline inside a one-quote string is
taken as a newline), ints and floats (underscores, 0x/0o/0b, exponents),
True/False/None, lists and tuples (arrays), dicts with string keys (objects).
`(x)` is x; `(x,)` is an array: a parenthesised value is held until its
first comma or its `)` says which.

Anything else (a positional argument, `*args`, a variable, an expression, a
set, bytes, an f-string, a non-string dict key, a complex number, nesting
deeper than the JSON scanner allows) fails that call: the transcoded text
gets an invalid JSON literal naming the problem, e.g.
`{"city": "Paris", "": pythonic-positional-argument `, and the call closes,
so the arguments parser reports "invalid literal 'pythonic-positional-
argument'" as the call's ParseError. (A bad escape inside a string becomes
the same bad escape in JSON: "invalid escape '\\x'".) Arguments before the
problem are complete units and run, as a fenced block's statements before a
syntax error do. The rest of the failed call is skipped by bracket count and
the list goes on with its next call. A call cut by the end of the output
closes with what it has; its parser reports the incomplete JSON.
"""

from __future__ import annotations

import ast
import json
import re
import unicodedata

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
from scheduler.parsers.json_stream import MAX_DEPTH

PYTHON_START = "<|python_start|>"
PYTHON_END = "<|python_end|>"

# What a failed call's JSON gets: an invalid literal that names the problem.
POSITIONAL = "pythonic-positional-argument"
EXPRESSION = "pythonic-unsupported-expression"
KEY = "pythonic-non-string-dict-key"
NUMBER = "pythonic-unsupported-number"
NESTING = "pythonic-nested-too-deep"

# Containers inside the arguments object (itself one level of the JSON).
_MAX_NESTING = MAX_DEPTH - 1

_BLANKS = re.compile(r"[ \t\r\n\f]*")
_WORD = re.compile(r"[\w.]*")
_NAME_START = re.compile(r"[^\W\d]")
_SKIP = re.compile(r"[^\"'()\[\]{}]*")
_STOPS = {q: re.compile(r"[\\" + q + "]") for q in "'\""}
_HEX = frozenset("0123456789abcdefABCDEF")
_OCTAL = frozenset("01234567")
_PREFIXES = frozenset("rRuU")  # a str's prefixes; b (bytes) and f (an expression) are not literals
_SIMPLE_ESCAPES = {
    "\\": "\\",
    "'": "'",
    '"': '"',
    "a": "\a",
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
    "v": "\v",
}
_HEX_DIGITS = {"x": 2, "u": 4, "U": 8}
_LITERALS = {"True": "true", "False": "false", "None": "null"}
_NUMBER_START = re.compile(r"[+-]?\.?\d")
_EXPONENT_SIGN = re.compile(r"[+-]?(?:\d[\d_]*\.?[\d_]*|\.\d[\d_]*)[eE]\Z")  # its sign comes next

_JSON_SPECIAL = re.compile(r'["\\\x00-\x1f\ud800-\udfff]')
_JSON_NAMED = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _json_chars(text: str) -> str:
    """Text as the inside of a JSON string (a lone surrogate as its escape)."""
    return _JSON_SPECIAL.sub(
        lambda m: _JSON_NAMED.get(m.group()) or f"\\u{ord(m.group()):04x}", text
    )


def _number(token: str) -> str | None:
    """A Python int or float literal as JSON, or None."""
    if not _NUMBER_START.match(token):
        return None
    try:
        value = ast.literal_eval(token)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None
    if type(value) is int:
        return str(value)
    if type(value) is float and value - value == 0:  # not inf or nan
        return repr(value)
    return None


class _Failed(Exception):
    """The call cannot be transcoded: `text` makes its JSON fail; the rest
    of the call is skipped from `depth` open brackets (and from inside a
    string opened by `string`: (quote, triple))."""

    def __init__(self, text: str, depth: int, string: tuple[str, bool] | None = None):
        self.text, self.depth, self.string = text, depth, string


class _Truncated(Exception):
    """The output ended inside the call."""


class _Input:
    """The text not yet consumed (and, from `mark`, text that may still be
    handed back as plain)."""

    __slots__ = ("text", "pos", "mark", "eof")

    def __init__(self) -> None:
        self.text = ""
        self.pos = 0
        self.mark: int | None = 0
        self.eof = False

    def add(self, piece: str) -> None:
        cut = self.pos if self.mark is None else min(self.mark, self.pos)
        self.text = self.text[cut:] + piece
        self.pos -= cut
        if self.mark is not None:
            self.mark -= cut


class PythonicRegion(Region):
    def __init__(self, marker: str):
        self._tagged = marker == PYTHON_START
        self._in = _Input()
        self._events: list[ScanEvent] = []
        self._parts: list[str] = []  # the call's JSON text not yet in an event
        self._sinks: list[list[str]] = []  # held JSON of parenthesised values not yet known
        self._nesting = 0
        self._done = False
        self._reader = self._envelope()

    # ---- the Region interface -------------------------------------------

    def feed(self, text: str) -> tuple[list[ScanEvent], str | None]:
        self._in.add(text)
        rest = self._resume()
        return self._take(), rest

    def finish(self) -> list[ScanEvent]:
        if not self._done:
            self._in.eof = True
            self._resume()
        return self._take()

    def _resume(self) -> str | None:
        if self._done:
            return None
        try:
            self._reader.send(None)
        except StopIteration as stop:
            self._done = True
            return stop.value or ""
        return None

    def _take(self) -> list[ScanEvent]:
        self._flush()
        events, self._events = self._events, []
        return events

    def _flush(self) -> None:
        if self._parts:
            self._events.append(CallText("".join(self._parts)))
            self._parts = []

    def _event(self, event: ScanEvent) -> None:
        self._flush()
        self._events.append(event)

    def _emit(self, text: str) -> None:
        (self._sinks[-1] if self._sinks else self._parts).append(text)

    # ---- reading ---------------------------------------------------------
    # Generators: each `yield` waits for the next piece of text.

    def _peek(self):
        """The next character, not consumed; None at the end of the output."""
        inp = self._in
        while inp.pos >= len(inp.text):
            if inp.eof:
                return None
            yield
        return inp.text[inp.pos]

    def _peek_at(self, k: int):
        """The character k after the next one, not consumed; None at the end."""
        inp = self._in
        while inp.pos + k >= len(inp.text):
            if inp.eof:
                return None
            yield
        return inp.text[inp.pos + k]

    def _need(self):
        """The next character inside a call (the output must go on)."""
        ch = yield from self._peek()
        if ch is None:
            raise _Truncated
        return ch

    def _blanks(self):
        """Consumes blanks; the next character, or None at the end."""
        inp = self._in
        while True:
            inp.pos = _BLANKS.match(inp.text, inp.pos).end()
            if inp.pos < len(inp.text):
                return inp.text[inp.pos]
            if inp.eof:
                return None
            yield

    def _blanks_need(self):
        ch = yield from self._blanks()
        if ch is None:
            raise _Truncated
        return ch

    def _word(self):
        """Consumes a run of word characters and dots (from the next one)."""
        inp = self._in
        parts = []
        while True:
            end = _WORD.match(inp.text, inp.pos).end()
            parts.append(inp.text[inp.pos : end])
            inp.pos = end
            if end < len(inp.text) or inp.eof:
                return "".join(parts)
            yield

    def _string_prefix(self, ch: str):
        """At ch: the prefix of a string literal that starts here ("" for a
        bare quote), or None when none does."""
        if ch in "'\"":
            return ""
        if ch in _PREFIXES:
            after = yield from self._peek_at(1)
            if after is not None and after in "'\"":
                return ch
        return None

    # ---- the envelope ----------------------------------------------------

    def _envelope(self):
        inp = self._in
        if self._tagged:
            ch = yield from self._blanks()
            if ch != "[":
                return inp.text[inp.mark :] if ch is not None else ""
            inp.pos += 1
        first = True
        while True:
            if not first:
                inp.mark = inp.pos
            ch = yield from self._blanks()
            if ch is None:
                return ""
            name = ""
            if _NAME_START.match(ch):
                name = yield from self._word()
                ch = yield from self._blanks()
            if not name or name.endswith(".") or ch != "(":
                if ch is None:
                    return ""
                # Not a call: plain text from the element on (from the "[" for
                # a bare list's first element, which the scanner matched).
                lead = "[" if first and not self._tagged else ""
                return lead + inp.text[inp.mark :]
            inp.pos += 1
            inp.mark = None
            first = False
            yield from self._call(name)
            ch = yield from self._blanks()
            if ch == ",":
                inp.pos += 1
                inp.mark = inp.pos
                ch = yield from self._blanks()
                if ch != "]":
                    continue
            if ch != "]":
                return inp.text[inp.pos :] if ch is not None else ""
            inp.pos += 1
            break
        if not self._tagged:
            return inp.text[inp.pos :]
        inp.mark = inp.pos
        ch = yield from self._blanks()
        while ch is not None:
            have = inp.text[inp.pos : inp.pos + len(PYTHON_END)]
            if not PYTHON_END.startswith(have):
                break
            if len(have) == len(PYTHON_END):
                return inp.text[inp.pos + len(PYTHON_END) :]
            if inp.eof:
                break
            yield
        return inp.text[inp.mark :]

    # ---- one call --------------------------------------------------------

    def _call(self, name: str):
        """Reads a call's arguments, after its "(", to its ")"."""
        self._event(CallOpened(Envelope.PYTHONIC, name, CallBody.ARGUMENTS))
        self._nesting = 0
        try:
            yield from self._arguments()
        except _Failed as failed:
            self._unwind()
            self._event(CallClosed())
            yield from self._skip(failed.depth, failed.string)
            return
        except _Truncated:
            self._unwind()
            self._event(CallClosed())
            return
        self._event(CallClosed())

    def _unwind(self) -> None:
        while self._sinks:  # a parenthesised value cut short: as a tuple
            held = self._sinks.pop()
            self._emit("[" + "".join(held))

    def _fail(self, kind: str, before: str = "") -> _Failed:
        """A failure where the JSON text is at `before` + a value."""
        self._emit(before + kind + " ")
        return _Failed(before + kind + " ", self._nesting)

    def _arguments(self):
        inp = self._in
        first = True
        while True:
            ch = yield from self._blanks_need()
            if ch == ")":
                inp.pos += 1
                self._emit("{}" if first else "}")
                return
            before = '{"": ' if first else ', "": '
            if not _NAME_START.match(ch):
                raise self._fail(POSITIONAL if ch in "'\"[({-+.0123456789" else EXPRESSION, before)
            keyword = yield from self._word()
            ch = yield from self._blanks_need()
            if ch != "=" or not keyword.isidentifier():
                raise self._fail(POSITIONAL, before)
            inp.pos += 1
            if (yield from self._need()) == "=":
                raise self._fail(EXPRESSION, before)
            self._emit(("{" if first else ", ") + json.dumps(keyword, ensure_ascii=False) + ": ")
            first = False
            yield from self._value()
            ch = yield from self._blanks_need()
            if ch == ",":
                inp.pos += 1
            elif ch == ")":
                inp.pos += 1
                self._emit("}")
                return
            else:
                raise self._fail(EXPRESSION, ', "": ')

    # ---- values ----------------------------------------------------------

    def _value(self):
        """One Python literal as JSON (at its first character, after blanks)."""
        inp = self._in
        ch = yield from self._blanks_need()
        prefix = yield from self._string_prefix(ch)
        if prefix is not None:
            inp.pos += len(prefix)
            yield from self._string(prefix)
        elif ch in "[({":
            if self._nesting >= _MAX_NESTING:
                raise self._fail(NESTING)
            self._nesting += 1
            if ch == "(":
                yield from self._parenthesised()
            else:
                yield from self._container(ch)
            self._nesting -= 1
        elif ch in "+-." or ch.isdigit():
            yield from self._scalar()
        elif _NAME_START.match(ch):
            word = yield from self._word()
            after = yield from self._need()
            if word in _LITERALS and after not in "'\"(.[":
                self._emit(_LITERALS[word])
            else:
                raise self._fail(EXPRESSION)
        else:
            raise self._fail(EXPRESSION)

    def _scalar(self):
        inp = self._in
        parts = []
        if inp.text[inp.pos] in "+-":
            parts.append(inp.text[inp.pos])
            inp.pos += 1
        while True:
            parts.append((yield from self._word()))
            ch = yield from self._need()
            token = "".join(parts)
            if ch in "+-" and _EXPONENT_SIGN.match(token):  # 1e-5
                parts.append(ch)
                inp.pos += 1
                continue
            break
        number = _number(token)
        if number is None:
            raise self._fail(NUMBER)
        self._emit(number)

    def _container(self, opener: str):
        """A list (array) or a dict (object), at its opener."""
        inp = self._in
        inp.pos += 1
        is_dict = opener == "{"
        closer = "}" if is_dict else "]"
        self._emit(opener)
        ch = yield from self._blanks_need()
        if ch == closer:
            inp.pos += 1
            self._emit(closer)
            return
        while True:
            if is_dict:
                yield from self._key(ch)
            yield from self._value()
            ch = yield from self._blanks_need()
            if ch == ",":
                inp.pos += 1
                ch = yield from self._blanks_need()
                if ch == closer:
                    break
                self._emit(", ")
                continue
            if ch == closer:
                break
            raise self._fail(EXPRESSION, ', "": ' if is_dict else ", ")
        inp.pos += 1
        self._emit(closer)

    def _key(self, ch: str):
        """A dict's key and its colon."""
        prefix = yield from self._string_prefix(ch)
        if prefix is None:
            raise self._fail(KEY, '"": ')
        self._in.pos += len(prefix)
        yield from self._string(prefix)
        ch = yield from self._blanks_need()
        if ch != ":":
            raise self._fail(EXPRESSION, ": ")
        self._in.pos += 1
        self._emit(": ")

    def _parenthesised(self):
        """`(x)` is x, `()` and `(x, …)` are arrays: the JSON is held until
        the first comma or the ")" says which."""
        inp = self._in
        inp.pos += 1
        held: list[str] = []
        self._sinks.append(held)
        ch = yield from self._blanks_need()
        if ch == ")":
            inp.pos += 1
            self._sinks.pop()
            self._emit("[]")
            return
        yield from self._value()
        ch = yield from self._blanks_need()
        if ch == ")":
            inp.pos += 1
            self._sinks.pop()
            self._emit("".join(held))
            return
        if ch != ",":
            raise self._fail(EXPRESSION, ", ")  # _unwind makes it a tuple
        inp.pos += 1
        self._sinks.pop()
        self._emit("[" + "".join(held))
        while True:
            ch = yield from self._blanks_need()
            if ch == ")":
                break
            self._emit(", ")
            yield from self._value()
            ch = yield from self._blanks_need()
            if ch == ",":
                inp.pos += 1
                continue
            if ch == ")":
                break
            raise self._fail(EXPRESSION, ", ")
        inp.pos += 1
        self._emit("]")

    # ---- strings ---------------------------------------------------------

    def _string(self, prefix: str):
        """Adjacent string literals as one JSON string (at the first one's
        quote, after its prefix)."""
        self._emit('"')
        while True:
            yield from self._literal(raw=prefix in ("r", "R"))
            ch = yield from self._blanks_need()
            prefix = yield from self._string_prefix(ch)
            if prefix is None:
                break
            self._in.pos += len(prefix)
        self._emit('"')

    def _literal(self, raw: bool):
        """One string literal, at its opening quote."""
        inp = self._in
        quote = inp.text[inp.pos]
        inp.pos += 1
        triple = False
        if (yield from self._need()) == quote:
            if (yield from self._peek_at(1)) == quote:
                triple = True
                inp.pos += 2
            else:
                inp.pos += 1  # ""
                return
        stop = _STOPS[quote]
        while True:
            if inp.pos >= len(inp.text):
                if inp.eof:
                    raise _Truncated
                yield
                continue
            m = stop.search(inp.text, inp.pos)
            end = m.start() if m else len(inp.text)
            if end > inp.pos:
                self._emit(_json_chars(inp.text[inp.pos : end]))
                inp.pos = end
            if m is None:
                continue
            if inp.text[end] == "\\":
                inp.pos += 1
                yield from self._escape(quote, triple, raw)
                continue
            if not triple:
                inp.pos += 1
                return
            quotes = 1
            while quotes < 3 and (yield from self._peek_at(quotes)) == quote:
                quotes += 1
            if quotes == 3:
                inp.pos += 3
                return
            if (yield from self._peek_at(quotes)) is None:
                raise _Truncated
            self._emit(_json_chars(quote * quotes))  # quotes inside the string
            inp.pos += quotes

    def _escape(self, quote: str, triple: bool, raw: bool):
        """After a backslash inside a string."""
        inp = self._in
        ch = yield from self._need()
        inp.pos += 1
        if raw:  # kept as written; it only stops the quote after it from ending the string
            self._emit(_json_chars("\\" + ch))
            return
        if ch == "\n":  # a line continuation
            return
        simple = _SIMPLE_ESCAPES.get(ch)
        if simple is not None:
            self._emit(_json_chars(simple))
            return
        if ch in _OCTAL:
            digits = ch
            while len(digits) < 3 and (yield from self._need()) in _OCTAL:
                digits += inp.text[inp.pos]
                inp.pos += 1
            self._emit(_json_chars(chr(int(digits, 8))))
            return
        if ch in _HEX_DIGITS:
            digits = ""
            while len(digits) < _HEX_DIGITS[ch]:
                digit = yield from self._need()
                if digit not in _HEX:
                    raise self._bad_escape(ch, digits + digit, quote, triple)
                digits += digit
                inp.pos += 1
            code = int(digits, 16)
            if code > 0x10FFFF:
                raise self._bad_escape(ch, "", quote, triple)
            self._emit(_json_chars(chr(code)))
            return
        if ch == "N":
            if (yield from self._need()) != "{":
                raise self._bad_escape(ch, "", quote, triple)
            inp.pos += 1
            name = []
            while (digit := (yield from self._need())) != "}":
                if digit in "\n" + quote or len(name) >= 100:
                    raise self._bad_escape(ch, "", quote, triple)
                name.append(digit)
                inp.pos += 1
            inp.pos += 1
            try:
                self._emit(_json_chars(unicodedata.lookup("".join(name))))
            except KeyError:
                raise self._bad_escape(ch, "", quote, triple) from None
            return
        self._emit(_json_chars("\\" + ch))  # an unknown escape keeps its backslash

    def _bad_escape(self, letter: str, seen: str, quote: str, triple: bool) -> _Failed:
        """A Python escape that is not one: the same bad escape in JSON
        (`\\x`, `\\N` and `\\U` are none; `\\u` fails at its bad digit)."""
        text = "\\" + letter + (_json_chars(seen) if letter == "u" else "")
        self._emit(text)
        return _Failed(text, self._nesting, (quote, triple))

    # ---- skipping a failed call -------------------------------------------

    def _skip(self, depth: int, string: tuple[str, bool] | None):
        """Skips to the failed call's ")" by bracket count (strings skipped)."""
        inp = self._in
        if string is not None:
            yield from self._skip_string(*string)
        while True:
            inp.pos = _SKIP.match(inp.text, inp.pos).end()
            ch = yield from self._peek()
            if ch is None:
                return
            if ch not in "'\"()[]{}":  # more text came: skip its run first
                continue
            if ch in "'\"":
                triple = (yield from self._peek_at(1)) == ch and (yield from self._peek_at(2)) == ch
                inp.pos += 3 if triple else 1
                yield from self._skip_string(ch, triple)
                continue
            inp.pos += 1
            if ch in "([{":
                depth += 1
            elif depth == 0:
                return
            else:
                depth -= 1

    def _skip_string(self, quote: str, triple: bool):
        inp = self._in
        stop = _STOPS[quote]
        while True:
            m = stop.search(inp.text, inp.pos)
            if m is None:
                inp.pos = len(inp.text)
                if (yield from self._peek()) is None:
                    return
                continue
            inp.pos = m.end()
            if m.group() == "\\":
                if (yield from self._peek()) is None:
                    return
                inp.pos += 1
            elif not triple:
                return
            elif (yield from self._peek()) == quote and (yield from self._peek_at(1)) == quote:
                inp.pos += 2
                return


FORMAT = EnvelopeFormat(
    name=Envelope.PYTHONIC,
    starts=("[", PYTHON_START),
    region=lambda marker, context: PythonicRegion(marker),
    at_output_start=True,
)

__all__ = ["FORMAT", "PYTHON_END", "PYTHON_START", "PythonicRegion"]
