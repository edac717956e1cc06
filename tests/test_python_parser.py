"""The Python statement parser: exact units, whatever the delta split."""

from __future__ import annotations

import ast
import sysconfig
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.parsers import PythonStatementParser


def parse(text: str, cuts: list[int] | None = None) -> list[str]:
    parser = PythonStatementParser()
    units, start = [], 0
    for cut in sorted(set(cuts or [])) + [len(text)]:
        units += parser.feed(text[start:cut])
        start = cut
    units += parser.finish()
    assert [u.index for u in units] == list(range(len(units)))
    return [u.text for u in units]


def stdlib_sources() -> list[Path]:
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    out = []
    for f in files:
        try:
            ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        out.append(f)
    return out


STDLIB = stdlib_sources()


def test_simple_statements_complete_at_their_newline():
    parser = PythonStatementParser()
    assert [u.text for u in parser.feed("import os\n")] == ["import os\n"]
    assert parser.feed("x = (1,\n") == []  # open bracket: not complete
    assert [u.text for u in parser.feed("2)\n")] == ["x = (1,\n2)\n"]


def test_compound_statement_waits_for_the_dedent():
    parser = PythonStatementParser()
    assert parser.feed("for i in range(3):\n    print(i)\n") == []
    assert parser.feed("\n") == []
    units = parser.feed("else:\n    pass\ny = 1\n")
    assert [u.text for u in units] == [
        "for i in range(3):\n    print(i)\n\nelse:\n    pass\n",
        "y = 1\n",
    ]


def test_decorators_strings_and_comments():
    text = (
        "# setup\n"
        "@functools.cache\n"
        "def f(x):\n"
        '    """doc with # and\n'
        "\n"
        'x = 1 inside"""\n'
        "    return x  # trailing\n"
        's = \'a # not a comment\' + """\n'
        'more"""\n'
        "t = ''\n"
        "u = r'\\'' \\\n"
        "  + 'v'\n"
        "match = 3\n"
    )
    units = parse(text)
    assert units[0].startswith("# setup\n@functools.cache\ndef f(x):")
    assert units[1].startswith("s = 'a # not a comment'")
    assert units[2] == "t = ''\n"
    assert units[3] == "u = r'\\'' \\\n  + 'v'\n"
    assert units[4] == "match = 3\n"
    assert "".join(units) == text


@pytest.mark.parametrize("path", STDLIB[::6], ids=lambda p: p.name)
def test_stdlib_units_compile_and_rejoin(path):
    text = path.read_text(encoding="utf-8")
    units = parse(text)
    joined = "".join(units)
    assert text.startswith(joined)
    assert all(
        not line.strip() or line.strip().startswith("#")
        for line in text[len(joined) :].splitlines()
    )
    for unit in units:
        compile(unit, str(path), "exec")


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(STDLIB), st.data())
def test_any_split_gives_the_same_units(path, data):
    text = path.read_text(encoding="utf-8")[:20000]
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=200))
    assert parse(text, cuts) == parse(text)


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(STDLIB))
def test_one_character_deltas(path):
    text = path.read_text(encoding="utf-8")[:4000]
    assert parse(text, list(range(len(text)))) == parse(text)
