"""Finds the run's tool-call envelopes in the model's streamed output.

In plain text the scanner looks for the start markers of the run's formats
(the earliest wins); from one on, that format's region reads the text until
its envelope ends, and the scanner is back in plain text. It holds back only
the few characters that could still turn into a marker, so a call's text
reaches its unit parser in the same delta it arrived in (a statement's
newline is never delayed waiting for a possible fence). Each delta is looked
at once: the cost is proportional to the output, never to its prefix.
"""

from __future__ import annotations

from collections.abc import Iterable

from scheduler.envelopes.base import (
    EnvelopeFormat,
    Region,
    ScanContext,
    ScanEvent,
    partial_suffix,
)


class EnvelopeScanner:
    def __init__(self, formats: Iterable[EnvelopeFormat], context: ScanContext | None = None):
        self._formats = list(formats)
        self._context = context or ScanContext()
        self._buf = ""  # plain text held back: it may begin a marker
        self._region: Region | None = None
        self._line_start = True  # the next character of _buf starts a line
        self._output_start = True  # nothing but blanks came before _buf

    @property
    def in_call(self) -> bool:
        return self._region is not None

    def feed(self, text: str) -> list[ScanEvent]:
        events: list[ScanEvent] = []
        while True:
            if self._region is None:
                if not text:
                    return events
                text = self._scan_text(self._buf + text)
                if self._region is None:
                    return events
            # A region is fed even with no text yet: a tag's call opens at once.
            more, rest = self._region.feed(text)
            events += more
            if rest is None:
                return events
            # An envelope ends mid-line, after other output.
            self._region, self._line_start, self._output_start = None, False, False
            text = rest

    def finish(self) -> list[ScanEvent]:
        """End of output: an open envelope is closed with what it has."""
        events = self._region.finish() if self._region is not None else []
        self._region, self._buf = None, ""
        return events

    def _scan_text(self, buf: str) -> str:
        """Skips plain text to the earliest marker and opens its region;
        returns the text after the marker ("" when no marker was found)."""
        found = self._earliest(buf)
        if found is None:
            keep = max(
                (self._partial(buf, f, m) for f in self._formats for m in f.starts), default=0
            )
            self._consumed(buf[: len(buf) - keep])
            self._buf = buf[len(buf) - keep :]
            return ""
        at, fmt, marker = found
        self._consumed(buf[:at])
        self._buf = ""
        self._region = fmt.region(marker, self._context)
        return buf[at + len(marker) :]

    def _earliest(self, buf: str) -> tuple[int, EnvelopeFormat, str] | None:
        best = None
        for fmt in self._formats:
            for marker in fmt.starts:
                at = self._find(buf, fmt, marker)
                if at >= 0 and (best is None or at < best[0]):
                    best = (at, fmt, marker)
        return best

    def _find(self, buf: str, fmt: EnvelopeFormat, marker: str) -> int:
        """The first place in buf where `marker` counts for `fmt`, or -1."""
        at = buf.find(marker)
        while at >= 0 and not self._counts(buf, at, fmt, marker):
            if fmt.at_output_start:
                return -1  # later places come after other output
            at = buf.find(marker, at + 1)
        return at

    def _counts(self, buf: str, at: int, fmt: EnvelopeFormat, marker: str) -> bool:
        if marker in fmt.anywhere:
            return True
        if fmt.at_line_start and not (buf[at - 1] == "\n" if at else self._line_start):
            return False
        if fmt.at_output_start and not (self._output_start and not buf[:at].strip()):
            return False
        return True

    def _partial(self, buf: str, fmt: EnvelopeFormat, marker: str) -> int:
        n = partial_suffix(buf, marker)
        return n if n and self._counts(buf, len(buf) - n, fmt, marker) else 0

    def _consumed(self, text: str) -> None:
        if text:
            self._line_start = text.endswith("\n")
            self._output_start = self._output_start and not text.strip()
