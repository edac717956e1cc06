"""Coverage-guided fuzzing of the incremental parsers with atheris.

    .venv/bin/pip install atheris
    PYTHONPATH=gen:. .venv/bin/python fuzz/fuzz_parsers.py -max_total_time=60

Each input is split in two: the first byte picks the parser, the rest is the
text, cut into deltas at positions drawn from the same bytes. A parser may
raise ParseFailure and nothing else, and the split text must fail where
the whole text fails and otherwise give exactly the same units. The same properties run in CI
as hypothesis tests (tests/test_json_parsers.py, tests/test_parsers_text_modes.py).
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from scheduler.parsers import (
        ParseFailure,
        ToolCallTagParser,
        arguments_parser_for,
        parser_for,
    )

MODES = ["PYTHON_STATEMENTS", "JSON_FIELDS", "LINES", "PLAN_STEPS", "SQL_STATEMENTS", "WHOLE"]


def _makers():
    makers = [lambda mode=mode: parser_for(mode) for mode in MODES]
    makers.append(lambda: arguments_parser_for("PYTHON_STATEMENTS", "code"))
    makers.append(lambda: ToolCallTagParser(lambda name: arguments_parser_for("JSON_FIELDS")))
    return makers


MAKERS = _makers()


def run(make, text: str, cuts: list[int]):
    parser, units, start = make(), [], 0
    try:
        for cut in sorted(set(cuts)) + [len(text)]:
            units += parser.feed(text[start:cut])
            start = cut
        units += parser.finish()
    except ParseFailure:
        return None
    return units


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    make = MAKERS[fdp.ConsumeIntInRange(0, len(MAKERS) - 1)]
    cuts = [fdp.ConsumeIntInRange(0, 256) for _ in range(fdp.ConsumeIntInRange(0, 16))]
    text = fdp.ConsumeUnicodeNoSurrogates(4096)
    cuts = [c for c in cuts if c <= len(text)]
    # Both fail, or both give exactly the same units.
    assert run(make, text, cuts) == run(make, text, []), (text, cuts)


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
