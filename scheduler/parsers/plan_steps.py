"""PARTIAL_MODE_PLAN_STEPS: one LLMCompiler-style plan step per unit.

A step starts a line as `$1 = tool(args)` (or `${1} = ...`) or as
`1. tool(args)` (or `1) ...`); `join()` is a step like any other. Its
argument list may span lines: the step is complete at the newline after the
`)` that closes it (or at the end of the call), with brackets inside string
literals ('...', "...", and triple-quoted ones, with backslash escapes)
ignored. Text after that `)` on its line is ignored, as LLMCompiler's own
parser does. Lines that are not steps (`Thought: ...`, prose, blank lines,
`<END_OF_PLAN>`) are skipped.

A unit is ParsedUnit(index, text=the call, e.g. 'search("x")', field=the
step id, depends_on=every $n / ${n} in the arguments, sorted). A step naming
an id >= its own, a duplicate id, mismatched brackets, a newline inside a
one-line string, or a step still open at the end of the call is a
ParseFailure.

Only the current line (or step) is kept, runs of ordinary characters are
skipped with one regex match or `str.find`, and brackets are tracked on a
small stack, so the cost per delta is proportional to the delta.
"""

from __future__ import annotations

import re

from scheduler.parsers.base import ParsedUnit, ParseFailure

# states
_HEAD = 0  # at a line's start, before its first non-blank char
_HEADER = 1  # a line that may start a step, up to its first "("
_SKIP = 2  # a line that is not a step, up to its newline
_CALL = 3  # in a step's argument list
_OPENING = 4  # counting the quotes that open a string
_STRING = 5  # in a one-line string
_TRIPLE = 6  # in a triple-quoted string
_ESCAPE = 7  # after a backslash in a string
_AFTER = 8  # after the step's closing ")", up to the newline

_NAME = r"[A-Za-z_][\w.]*"
_HEADER_RE = re.compile(
    rf"(?:\$(?:\{{([0-9]+)\}}|([0-9]+))[ \t]*=|([0-9]+)[ \t]*[.)])[ \t]*(?P<name>{_NAME})[ \t]*\("
)
_CALL_RE = re.compile(rf"[ \t\r\n]*({_NAME})[ \t\r\n]*\((.*)\)[ \t\r\n]*", re.DOTALL)
# A reference to a step's result: $1 or ${1} (group 1 or 2 is the number).
STEP_REF = re.compile(r"\$(?:\{([0-9]+)\}|([0-9]+))")
_BLANKS = re.compile(r"[ \t\r\f\v]*")
_HEADER_RUN = re.compile(r"[^(\n]*")
_CALL_RUN = re.compile(r"[^()\[\]{}'\"]*")
_STRING_RUN = {q: re.compile(rf"[^{q}\\\n]*") for q in "'\""}
_TRIPLE_RUN = {q: re.compile(rf"[^{q}\\]*") for q in "'\""}
_CLOSES = {")": "(", "]": "[", "}": "{"}


def split_call(text: str) -> tuple[str, str]:
    """('search', '"weather in Paris"') for 'search("weather in Paris")'."""
    m = _CALL_RE.fullmatch(text)
    if m is None:
        raise ParseFailure(f"not a tool call: {text[:60]!r}")
    return m.group(1), m.group(2)


class PlanStepParser:
    def __init__(self) -> None:
        self._index = 0
        self._state = _HEAD
        self._parts: list[str] = []  # the current header or step's text so far
        self._stack: list[str] = []  # the open brackets of the current step
        self._quote = ""  # the open string's quote: ' " ''' or """
        self._quotes = 0  # quotes counted toward opening or closing a triple string
        self._escaped_state = _STRING  # where a backslash escape returns
        self._step = 0  # the current step's id
        self._step_line = 0  # the line the current step starts at
        self._ids: set[int] = set()
        self._newlines = 0  # newlines before self._counted in the current delta
        self._counted = 0
        self._failure = ""  # the kept ParseFailure's message, raised on the next call

    def feed(self, text: str) -> list[ParsedUnit]:
        # A failure is raised one call late, so the steps before it are handed
        # out whatever the split (see UnitParser).
        if self._failure:
            raise ParseFailure(self._failure)
        units: list[ParsedUnit] = []
        try:
            self._feed(text, units)
        except ParseFailure as e:
            self._failure = str(e)
        return units

    def _feed(self, text: str, units: list[ParsedUnit]) -> None:
        state = self._state
        i, n = 0, len(text)
        start = 0  # where the current header or step's part of `text` starts
        while i < n:
            if state == _CALL:
                i = _CALL_RUN.match(text, i).end()
                if i == n:
                    break
                ch = text[i]
                i += 1
                if ch in "([{":
                    self._stack.append(ch)
                elif ch in _CLOSES:
                    if _CLOSES[ch] != self._stack[-1]:
                        raise ParseFailure(
                            f"step {self._step}: {ch!r} on line {self._line_at(text, i)}"
                            f" does not close {self._stack[-1]!r}"
                        )
                    self._stack.pop()
                    if not self._stack:
                        self._parts.append(text[start:i])
                        state = _AFTER
                else:  # a quote
                    self._quote, self._quotes = ch, 1
                    state = _OPENING
            elif state == _STRING:
                i = _STRING_RUN[self._quote].match(text, i).end()
                if i == n:
                    break
                ch = text[i]
                i += 1
                if ch == "\\":
                    state, self._escaped_state = _ESCAPE, _STRING
                elif ch == "\n":
                    raise ParseFailure(
                        f"step {self._step}: a string is not closed at the end of line"
                        f" {self._line_at(text, i)}"
                    )
                else:
                    state = _CALL
            elif state == _HEAD:
                i = _BLANKS.match(text, i).end()
                if i == n:
                    break
                ch = text[i]
                if ch == "\n":
                    i += 1
                elif ch == "$" or "0" <= ch <= "9":
                    state, start = _HEADER, i
                else:
                    state = _SKIP
            elif state == _SKIP or state == _AFTER:
                end = text.find("\n", i)
                if end < 0:
                    i = n
                    break
                i = end + 1
                if state == _AFTER:
                    self._emit(units)
                state = _HEAD
            elif state == _HEADER:
                i = _HEADER_RUN.match(text, i).end()
                if i == n:
                    break
                ch = text[i]
                i += 1
                if ch == "\n":
                    self._parts = []  # not a step
                    state = _HEAD
                    continue
                self._parts.append(text[start:i])
                header = "".join(self._parts)
                m = _HEADER_RE.fullmatch(header)
                if m is None:
                    self._parts = []
                    state = _SKIP
                    continue
                self._begin(int(m.group(1) or m.group(2) or m.group(3)), self._line_at(text, i))
                self._parts = [header[m.start("name") :]]
                self._stack = ["("]
                state, start = _CALL, i
            elif state == _OPENING:
                if text[i] == self._quote:
                    i += 1
                    self._quotes += 1
                    if self._quotes == 3:
                        self._quote *= 3
                        self._quotes = 0
                        state = _TRIPLE
                else:  # one quote opens a string; two are an empty one
                    state = _STRING if self._quotes == 1 else _CALL
            elif state == _TRIPLE:
                end = _TRIPLE_RUN[self._quote[0]].match(text, i).end()
                if end > i:
                    self._quotes = 0
                    i = end
                    if i == n:
                        break
                ch = text[i]
                i += 1
                if ch == "\\":
                    self._quotes = 0
                    state, self._escaped_state = _ESCAPE, _TRIPLE
                else:
                    self._quotes += 1
                    if self._quotes == 3:
                        self._quote, self._quotes = "", 0
                        state = _CALL
            else:  # _ESCAPE: the escaped char, whatever it is
                i += 1
                state = self._escaped_state
        if state in (_HEADER, _CALL, _OPENING, _STRING, _TRIPLE, _ESCAPE) and start < n:
            self._parts.append(text[start:] if start else text)
        self._state = state
        self._newlines += text.count("\n", self._counted)
        self._counted = 0

    def finish(self) -> list[ParsedUnit]:
        if self._failure:
            raise ParseFailure(self._failure)
        units: list[ParsedUnit] = []
        state = self._state
        if state == _OPENING and self._quotes == 2:  # an empty string
            state = _CALL
        if state == _AFTER:
            self._emit(units)
        elif state == _CALL:
            raise ParseFailure(
                f"step {self._step} starting at line {self._step_line} is not closed:"
                f" {''.join(self._stack)!r} still open"
            )
        elif state != _HEAD and state != _SKIP and state != _HEADER:
            raise ParseFailure(
                f"step {self._step} starting at line {self._step_line} has an unterminated string"
            )
        self._state, self._parts = _HEAD, []
        return units

    def _begin(self, step: int, line: int) -> None:
        if step in self._ids:
            raise ParseFailure(f"step {step} on line {line} repeats an earlier step's id")
        self._ids.add(step)
        self._step, self._step_line = step, line

    def _emit(self, units: list[ParsedUnit]) -> None:
        text = "".join(self._parts)
        self._parts = []
        step = self._step
        deps = sorted({int(a or b) for a, b in STEP_REF.findall(text)})
        if deps and deps[-1] >= step:
            raise ParseFailure(
                f"step {step} (line {self._step_line}) depends on ${deps[-1]},"
                " which is not an earlier step"
            )
        units.append(ParsedUnit(self._index, text, str(step), tuple(deps)))
        self._index += 1

    def _line_at(self, text: str, i: int) -> int:
        """The 1-based line of the call's text that holds text[i - 1]. Calls
        within one delta come with growing `i`, so the counting is linear."""
        self._newlines += text.count("\n", self._counted, i - 1)
        self._counted = i - 1
        return self._newlines + 1
