"""The tool-call formats Conveyor recognises, one module each, registered
by name; and the scanner that finds them in a model's streamed output.

To add a format: write `scheduler/envelopes/<name>.py` with a `FORMAT`
(`EnvelopeFormat`: its start markers, where they count, and the `Region`
that turns an envelope's text into call events), and add it to `_MODULES`
below. The plan envelope is not here: a plan is the whole output
(scheduler/plans.py).
"""

from __future__ import annotations

from collections.abc import Iterable

from scheduler.envelopes import (
    deepseek,
    fence,
    harmony,
    llama3_json,
    mistral,
    pythonic,
    qwen3_coder,
    tag,
)
from scheduler.envelopes.base import (
    CallBody,
    CallClosed,
    CallOpened,
    CallText,
    EnvelopeFormat,
    Region,
    ScanContext,
    ScanEvent,
    UntilMarker,
)
from scheduler.envelopes.scanner import EnvelopeScanner

_MODULES = (fence, tag, llama3_json, pythonic, mistral, qwen3_coder, deepseek, harmony)
FORMATS: dict[str, EnvelopeFormat] = {m.FORMAT.name: m.FORMAT for m in _MODULES}


def formats_named(names: Iterable[str]) -> list[EnvelopeFormat]:
    """The registered formats of these names, in registry order; an unknown
    name is a ValueError naming the known ones."""
    wanted = set(names)
    unknown = wanted - set(FORMATS)
    if unknown:
        raise ValueError(f"unknown tool-call formats {sorted(unknown)}; known: {sorted(FORMATS)}")
    return [f for name, f in FORMATS.items() if name in wanted]


__all__ = [
    "FORMATS",
    "CallBody",
    "CallClosed",
    "CallOpened",
    "CallText",
    "EnvelopeFormat",
    "EnvelopeScanner",
    "Region",
    "ScanContext",
    "ScanEvent",
    "UntilMarker",
    "formats_named",
]
