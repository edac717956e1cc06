"""PARTIAL_MODE_LINES: one complete line per unit (search queries, shell lines).

A line is complete at its newline. The unit's text is the line without the
newline (and without the `\\r` of a `\\r\\n`); a line holding only whitespace
is no unit. A last line with no newline is emitted by finish(). Only the
current line's pieces are kept, and each delta is searched for newlines with
`str.find`, so the cost is proportional to the text fed.
"""

from __future__ import annotations

from scheduler.parsers.base import ParsedUnit


class LinesParser:
    def __init__(self) -> None:
        self._index = 0
        self._parts: list[str] = []  # the current line's text so far

    def feed(self, text: str) -> list[ParsedUnit]:
        units: list[ParsedUnit] = []
        start = 0
        end = text.find("\n")
        while end >= 0:
            line = text[start:end]
            if self._parts:
                self._parts.append(line)
                line = "".join(self._parts)
                self._parts = []
            self._emit(line, units)
            start = end + 1
            end = text.find("\n", start)
        if start < len(text):
            self._parts.append(text[start:] if start else text)
        return units

    def finish(self) -> list[ParsedUnit]:
        units: list[ParsedUnit] = []
        if self._parts:
            line = "".join(self._parts)
            self._parts = []
            self._emit(line, units)
        return units

    def _emit(self, line: str, units: list[ParsedUnit]) -> None:
        if line.endswith("\r"):
            line = line[:-1]
        if line and not line.isspace():
            units.append(ParsedUnit(self._index, line))
            self._index += 1
