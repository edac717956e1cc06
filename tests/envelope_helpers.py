"""What the format tests share: feeding a scanner a text cut at given
places, with the text events merged (text may arrive in any number of
pieces, so only the merged events must not depend on the cuts)."""

from __future__ import annotations

from collections.abc import Iterable

from scheduler.envelopes import CallText, EnvelopeScanner


def merged(events: list) -> list:
    out: list = []
    for e in events:
        if isinstance(e, CallText) and out and isinstance(out[-1], CallText):
            out[-1] = CallText(out[-1].text + e.text)
        else:
            out.append(e)
    return out


def scan_cut(scanner: EnvelopeScanner, text: str, cuts: Iterable[int] = ()) -> list:
    """The merged events of `text` fed in pieces cut at `cuts`, then finished."""
    events, start = [], 0
    for cut in [*sorted(set(cuts)), len(text)]:
        events += scanner.feed(text[start:cut])
        start = cut
    return merged(events + scanner.finish())
