"""PARTIAL_MODE_PYTHON_STATEMENTS: one complete top-level statement per unit.

A character-level state machine tracks just enough of Python's lexical
structure (strings, comments, brackets, backslash continuations) to know
where a logical line ends. Each character is looked at once, so the cost per
delta is proportional to the delta, never to the text before it.

A simple statement is complete at the newline that ends its logical line.
A compound statement (if/for/while/try/with/def/class/async/decorators,
match) is the one place a lookahead is needed: it ends only at the next
logical line at indentation 0 that is not `elif/else/except/finally`, or at
the end of the call. Blank and comment-only lines travel with the statement
after them (or with the open compound statement they sit in), so the units
joined give back the input.

Lines end as in Python's tokenizer: at "\n", "\r\n" or a lone "\r" (so a
line ending in "\r" is complete only once the next character shows no "\n"
belongs to it, or at the end of the call); a backslash before any of them
continues the line. A form feed in a line's leading whitespace resets its
column, so "\fx = 1" is not indented. A NUL character, which Python source
cannot hold, is a ParseFailure, deferred as UnitParser says.
"""

from __future__ import annotations

import re

from scheduler.parsers.base import ParsedUnit, ParseFailure

_COMPOUND = re.compile(r"(if|for|while|try|with|def|class|async)\b")
_SOFT_COMPOUND = re.compile(r"(match)\b")  # `match = 3` is an assignment
_CONTINUATION = re.compile(r"(elif|else|except|finally)\b")
_DEFINITION = re.compile(r"(def|class|async|@)")
_QUOTES = "'\""
_PLAIN = re.compile(r"[^\r\n\x00#'\"\\()\[\]{}]*")
_STRING_BODY = {q: re.compile(rf"[^{q}\\\r\n\x00]*") for q in _QUOTES}
_COMMENT_BODY = re.compile(r"[^\r\n\x00]*")
_OPEN = "([{"
_CLOSE = ")]}"


class PythonStatementParser:
    def __init__(self) -> None:
        self._index = 0
        self._line: list[str] = []  # the current logical line, newlines included
        self._held: list[str] = []  # lines of the statement not yet emitted
        self._held_compound = False
        self._held_decorators_only = False
        # lexer state
        self._depth = 0
        self._quote = ""  # the open string's delimiter: ' " ''' or """
        self._opening = ""  # quote char being counted at a string's start
        self._opening_count = 0
        self._closing_run = 0  # consecutive quote chars toward closing a triple string
        self._escape = False
        self._comment = False
        self._backslash = False
        self._last_significant = ""  # last char of code (not comment, not space)
        self._cr = False  # the last char was a "\r": a "\n" right after it is part of it
        self._cr_ends = False  # ... and it ends the logical line (once that "\n" is seen or not)
        self._offset = 0  # characters fed before this piece, for messages
        self._failure: str | None = None  # kept: the next feed() or finish() raises it

    # ---- public ----------------------------------------------------------

    def feed(self, text: str) -> list[ParsedUnit]:
        if self._failure is not None:
            raise ParseFailure(self._failure)
        units: list[ParsedUnit] = []
        i, n = 0, len(text)
        while i < n:
            if self._cr:
                self._cr = False
                if text[i] == "\n":
                    self._line.append("\n")
                    i += 1
                if self._cr_ends:
                    self._cr_ends = False
                    self._end_logical_line(units)
                continue
            end = self._skip_run(text, i)
            if end > i:
                i = end
                continue
            ch = text[i]
            if ch == "\x00":  # raised by the next call; `units` go out now
                self._failure = (
                    f"Python source cannot contain a null character (character {self._offset + i})"
                )
                return units
            if self._step(ch):
                self._end_logical_line(units)
            i += 1
        self._offset += n
        return units

    def _skip_run(self, text: str, i: int) -> int:
        """Consumes a run of characters that change no state but the current
        line (code without quotes, brackets or newlines; string or comment
        bodies) in one regex match; returns where the run ends."""
        if self._opening or self._backslash or self._escape:
            return i
        if self._comment:
            end = _COMMENT_BODY.match(text, i).end()
        elif self._quote:
            end = _STRING_BODY[self._quote[0]].match(text, i).end()
            if end > i:
                self._closing_run = 0
        else:
            end = _PLAIN.match(text, i).end()
            if end > i:
                code = text[i:end].rstrip(" \t\f")
                if code:
                    self._last_significant = code[-1]
        if end > i:
            self._line.append(text[i:end])
        return end

    def finish(self) -> list[ParsedUnit]:
        if self._failure is not None:
            raise ParseFailure(self._failure)
        units: list[ParsedUnit] = []
        if self._opening:
            self._settle_opening("")
        self._cr = False
        if self._cr_ends:
            self._cr_ends = False
            self._end_logical_line(units)
        if self._line:
            self._end_logical_line(units)
        self._flush(units)
        return units

    # ---- lexer -----------------------------------------------------------

    def _step(self, ch: str) -> bool:
        """Consumes one char; True when it ended a logical line."""
        if self._opening:
            if ch == self._opening and self._opening_count < 3:
                self._opening_count += 1
                self._line.append(ch)
                if self._opening_count == 3:
                    self._quote = self._opening * 3
                    self._opening, self._opening_count = "", 0
                return False
            self._settle_opening(ch)
        self._line.append(ch)
        if ch == "\r":  # a newline, as "\n" is
            self._cr = True
            ch = "\n"
        if self._quote:
            self._in_string(ch)
            return False
        if self._comment:
            if ch == "\n":
                self._comment = False
                return self._newline()
            return False
        if ch == "\n":
            return self._newline()
        if self._backslash:
            self._backslash = False  # a backslash not before a newline: nothing special
        if ch in " \t\f":
            return False
        if ch == "#":
            self._comment = True
            return False
        if ch == "\\":
            self._backslash = True
            return False
        self._last_significant = ch
        if ch in _QUOTES:
            self._opening, self._opening_count = ch, 1
        elif ch in _OPEN:
            self._depth += 1
        elif ch in _CLOSE:
            self._depth = max(0, self._depth - 1)
        return False

    def _settle_opening(self, next_ch: str) -> None:
        """A string's opening quotes ended before a third: one quote opens a
        string; two are an empty string."""
        if self._opening_count == 1:
            self._quote = self._opening
        self._opening, self._opening_count = "", 0

    def _in_string(self, ch: str) -> None:
        if self._escape:
            self._escape = False
            return
        if ch == "\\":
            self._escape = True
            self._closing_run = 0
            return
        if len(self._quote) == 1:
            if ch == self._quote or ch == "\n":  # a newline ends a broken string
                self._quote = ""
            return
        if ch == self._quote[0]:
            self._closing_run += 1
            if self._closing_run == 3:
                self._quote, self._closing_run = "", 0
        else:
            self._closing_run = 0

    def _newline(self) -> bool:
        if self._backslash:
            self._backslash = False
            return False
        if self._depth:
            return False
        if self._cr:  # ends the line once the next char shows whether "\n" follows
            self._cr_ends = True
            return False
        return True

    # ---- statements ------------------------------------------------------

    def _end_logical_line(self, units: list[ParsedUnit]) -> None:
        line = "".join(self._line)
        last = self._last_significant
        self._line, self._last_significant = [], ""
        self._depth = 0
        stripped = line.lstrip(" \t\f")
        if not stripped.strip() or stripped.startswith("#"):
            self._held.append(line)  # blank or comment: rides with what follows
            return
        # A form feed resets the column, as in Python's tokenizer.
        indent = line[: len(line) - len(stripped)].rpartition("\f")[2]
        if indent:  # indented: part of the open compound statement
            self._held.append(line)
            if not self._held_compound:
                self._flush(units)
            return
        if self._held_compound:
            if _CONTINUATION.match(stripped) or (
                self._held_decorators_only and _DEFINITION.match(stripped)
            ):
                self._held.append(line)
                self._held_decorators_only = stripped.startswith("@")
                return
            self._flush_compound(units)
        self._held.append(line)
        if (
            _COMPOUND.match(stripped)
            or stripped.startswith("@")
            or (_SOFT_COMPOUND.match(stripped) and last == ":")
        ):
            self._held_compound = True
            self._held_decorators_only = stripped.startswith("@")
        else:
            self._flush(units)

    def _flush_compound(self, units: list[ParsedUnit]) -> None:
        # Trailing blank/comment lines belong to the next statement.
        trailing: list[str] = []
        while self._held and _is_blank_or_comment(self._held[-1]):
            trailing.insert(0, self._held.pop())
        self._flush(units)
        self._held = trailing

    def _flush(self, units: list[ParsedUnit]) -> None:
        self._held_compound = self._held_decorators_only = False
        if not self._held:
            return
        text = "".join(self._held)
        if all(_is_blank_or_comment(line) for line in self._held):  # logical lines
            self._held = [text]  # nothing to run yet
            return
        self._held = []
        units.append(ParsedUnit(self._index, text))
        self._index += 1


def _is_blank_or_comment(line: str) -> bool:
    s = line.strip()
    return not s or s.startswith("#")
