"""The unit parser interface and the trivial whole-call parser."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class ParsedUnit:
    index: int
    text: str
    field: str = (
        ""  # JSON fields: the field (or "name[i]" for an array element); plans: the step id
    )
    depends_on: tuple[int, ...] = ()  # plan steps: the $n this step names


class ParseFailure(ValueError):
    """The call's text cannot be parsed; the message says where and why. A
    parser that raised it takes no more input."""


class UnitParser(Protocol):
    """Fed every piece of a call's text once, in order, then finished once.

    Malformed text: a parser raises ParseFailure and never any other
    exception, whatever the input. The units handed out never depend on how
    the text was cut into pieces, malformed text included: every unit that
    is complete before the error's position is handed out, and none after
    it. So the failure is deferred by one call: the feed() that meets an
    error returns the units completed before it and keeps the failure; the
    next feed() or finish() raises it (finish() always raises a kept one), as
    does every call after. A caller that stops at the first ParseFailure
    has then seen the same units for any split. (The parsers keep the
    failure's message in `_failure` and check it first thing in both calls.)
    """

    def feed(self, text: str) -> list[ParsedUnit]:
        """Consumes the next piece of the call's text; returns the units it
        completed (those before an error in it; the error is raised next call)."""

    def finish(self) -> list[ParsedUnit]:
        """The call's text ended; returns the units still open, or raises the
        kept ParseFailure, or one for text that ended too soon."""


class WholeParser:
    """PARTIAL_MODE_WHOLE: the entire call is one unit, complete at the end."""

    def __init__(self) -> None:
        self._parts: list[str] = []

    def feed(self, text: str) -> list[ParsedUnit]:
        self._parts.append(text)
        return []

    def finish(self) -> list[ParsedUnit]:
        text = "".join(self._parts)
        return [ParsedUnit(0, text)] if text.strip() else []
