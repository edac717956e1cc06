"""PARTIAL_MODE_SQL_STATEMENTS: one statement per unit, ended by `;`.

A small state machine tracks SQL's lexical structure just far enough to know
which `;` ends a statement: not one inside a '...' string (where '' is a
quote), a "..." quoted identifier (where "" is a quote), a `-- ...` line
comment or a `/* ... */` block comment. The escapes need no lookahead: a
quote right after the quote that closed a string reopens it, which is what
the doubled quote means.

The unit's text is the statement with its `;`, leading whitespace stripped;
comments before a statement ride with it. A `;` with nothing but whitespace
and comments before it is no unit. A statement left without `;` at finish()
is emitted if it holds anything besides whitespace and comments; a string,
identifier or block comment still open at finish() is a ParseFailure.

Runs of ordinary characters are skipped with one regex match or `str.find`,
and the current statement is kept as slices of the deltas, so the cost per
delta is proportional to the delta.
"""

from __future__ import annotations

import re

from scheduler.parsers.base import ParsedUnit, ParseFailure

# states
_CODE = 0
_DASH = 1  # a '-' that may start `--`
_SLASH = 2  # a '/' that may start `/*`
_LINE_COMMENT = 3
_BLOCK = 4
_BLOCK_STAR = 5  # a '*' in a block comment that may end it
_SQ = 6  # in '...'
_SQ_END = 7  # just after a closing ': another ' is an escaped quote
_DQ = 8  # in "..."
_DQ_END = 9

# Code up to the next char that matters; group 1 starts at the first non-space.
_CODE_RUN = re.compile(r"\s*([^;'\"/\-]*)")

_WHAT = {
    _SQ: "string",
    _SQ_END: "string",
    _DQ: "quoted identifier",
    _DQ_END: "quoted identifier",
    _BLOCK: "block comment",
    _BLOCK_STAR: "block comment",
}


class SqlStatementParser:
    def __init__(self) -> None:
        self._index = 0
        self._state = _CODE
        self._parts: list[str] = []  # the current statement's text so far
        self._content = False  # the statement holds more than whitespace and comments
        self._open_line = 0  # where the open string or block comment started
        self._newlines = 0  # newlines before self._counted in the current delta
        self._counted = 0

    def feed(self, text: str) -> list[ParsedUnit]:
        units: list[ParsedUnit] = []
        state, content = self._state, self._content
        i, n = 0, len(text)
        start = 0  # where the current statement's part of `text` starts
        while i < n:
            if state == _CODE:
                m = _CODE_RUN.match(text, i)
                if m.end(1) > m.start(1):
                    content = True
                i = m.end()
                if i == n:
                    break
                ch = text[i]
                i += 1
                if ch == ";":
                    if content:
                        statement = text[start:i]
                        if self._parts:
                            self._parts.append(statement)
                            statement = "".join(self._parts)
                        units.append(ParsedUnit(self._index, statement.lstrip()))
                        self._index += 1
                    self._parts = []
                    start = i
                    content = False
                elif ch == "'":
                    state, content = _SQ, True
                    self._open_line = self._line_at(text, i)
                elif ch == '"':
                    state, content = _DQ, True
                    self._open_line = self._line_at(text, i)
                elif ch == "-":
                    state = _DASH
                else:  # "/"
                    state = _SLASH
            elif state == _SQ or state == _DQ:
                end = text.find("'" if state == _SQ else '"', i)
                if end < 0:
                    i = n
                else:
                    i = end + 1
                    state += 1  # the matching _END state
            elif state == _SQ_END or state == _DQ_END:
                if text[i] == ("'" if state == _SQ_END else '"'):
                    state -= 1  # a doubled quote: still in the string
                    i += 1
                else:
                    state = _CODE
            elif state == _LINE_COMMENT:
                end = text.find("\n", i)
                if end < 0:
                    i = n
                else:
                    i = end + 1
                    state = _CODE
            elif state == _BLOCK:
                end = text.find("*", i)
                if end < 0:
                    i = n
                else:
                    i = end + 1
                    state = _BLOCK_STAR
            elif state == _BLOCK_STAR:
                ch = text[i]
                if ch == "/":
                    state = _CODE
                elif ch != "*":
                    state = _BLOCK
                i += 1
            elif state == _DASH:
                if text[i] == "-":
                    state = _LINE_COMMENT
                    i += 1
                else:  # a minus sign: code
                    state, content = _CODE, True
            else:  # _SLASH
                if text[i] == "*":
                    i += 1
                    state = _BLOCK
                    self._open_line = self._line_at(text, i)
                else:  # a division: code
                    state, content = _CODE, True
        if start < n:
            self._parts.append(text[start:] if start else text)
        self._state, self._content = state, content
        self._newlines += text.count("\n", self._counted)
        self._counted = 0
        return units

    def finish(self) -> list[ParsedUnit]:
        state = self._state
        if state in _WHAT:
            raise ParseFailure(f"unterminated {_WHAT[state]} starting at line {self._open_line}")
        units: list[ParsedUnit] = []
        if self._content or state == _DASH or state == _SLASH:
            units.append(ParsedUnit(self._index, "".join(self._parts).strip()))
            self._index += 1
        self._parts = []
        self._state, self._content = _CODE, False
        return units

    def _line_at(self, text: str, i: int) -> int:
        """The 1-based line of the call's text that holds text[i - 1]. Calls
        within one delta come with growing `i`, so the counting is linear."""
        self._newlines += text.count("\n", self._counted, i - 1)
        self._counted = i - 1
        return self._newlines + 1
