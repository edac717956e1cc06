"""Helpers the formats share for reading their envelopes: where a JSON value
written in pieces ends, and which marker (if any) is written at a place."""

from __future__ import annotations

import re


class JsonExtent:
    """Where one JSON object or array written in pieces ends: the depth of
    its braces and brackets outside strings, each character looked at once.
    It validates nothing (the call's parser does): it only finds the end.

    `advance` also stops at a `<` (outside strings, or everywhere with
    `stop_in_strings`), where the caller looks for its format's markers;
    `stop_at_markers=False` reads through them. `depth` is for a caller that
    has already read the opening bracket."""

    _OUTSIDE = re.compile(r'[{}\[\]"<]')
    _OUTSIDE_ONLY = re.compile(r'[{}\[\]"]')
    _INSIDE = re.compile(r'["\\]')
    _INSIDE_STOP = re.compile(r'["\\<]')

    def __init__(self, stop_in_strings: bool = False, stop_at_markers: bool = True, depth: int = 0):
        self.done = False
        self._depth = depth
        self._in_string = False
        self._escape = False
        self._inside = self._INSIDE_STOP if stop_in_strings else self._INSIDE
        self._outside = self._OUTSIDE if stop_at_markers else self._OUTSIDE_ONLY

    def advance(self, text: str, i: int) -> int:
        """Reads text from i; returns the index just after the value's end
        (then `done`), the index of a `<` to look at, or len(text)."""
        n = len(text)
        while i < n:
            if self._escape:
                self._escape = False
                i += 1
                continue
            if self._in_string:
                m = self._inside.search(text, i)
                if m is None:
                    return n
                i = m.start()
                ch = text[i]
                if ch == "<":
                    return i
                if ch == "\\":
                    self._escape = True
                else:
                    self._in_string = False
                i += 1
                continue
            m = self._outside.search(text, i)
            if m is None:
                return n
            i = m.start()
            ch = text[i]
            if ch == "<":
                return i
            if ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
            else:
                self._depth -= 1
                if self._depth <= 0:
                    self.done = True
                    return i + 1
            i += 1
        return n


def marker_at(text: str, i: int, markers: tuple[str, ...]) -> str | None:
    """The marker written at text[i:]; "" when text ends in a proper prefix
    of one (wait for more); None when none is there."""
    partial = False
    left = len(text) - i
    for marker in markers:
        if text.startswith(marker, i):
            return marker
        if left < len(marker) and marker.startswith(text[i:]):  # a short slice
            partial = True
    return "" if partial else None


class MarkerSet:
    """Several markers looked for at once: only the places holding one of
    their first characters are tried (a `find` each, in C)."""

    def __init__(self, markers: tuple[str, ...]):
        self.markers = markers
        self._firsts = tuple(sorted({m[0] for m in markers}))
        self._longest = max(len(m) for m in markers)

    def earliest(self, text: str, start: int = 0) -> tuple[int, str]:
        """The first marker in text[start:] and where it is; (-1, "") if none."""
        best, found = -1, ""
        for first in self._firsts:
            at = text.find(first, start)
            while at >= 0 and (best < 0 or at < best):
                for marker in self.markers:
                    if text.startswith(marker, at):
                        best, found = at, marker
                        break
                else:
                    at = text.find(first, at + 1)
                    continue
                break
        return best, found

    def held(self, text: str, start: int = 0) -> int:
        """Characters at the end of text[start:] that may begin a marker."""
        tail = max(start, len(text) - self._longest + 1)
        best = 0
        for first in self._firsts:
            at = text.find(first, tail)
            while at >= 0 and len(text) - at > best:
                if any(m.startswith(text[at:]) for m in self.markers):
                    best = len(text) - at
                    break
                at = text.find(first, at + 1)
        return best
