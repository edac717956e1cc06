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
    def feed(self, text: str) -> list[ParsedUnit]:
        """Consumes the next piece of the call's text; returns the units it completed."""

    def finish(self) -> list[ParsedUnit]:
        """The call's text ended; returns the units still open."""


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
