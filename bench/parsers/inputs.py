"""Benchmark inputs built from real data, one per partial mode, at a given size.

Python is real standard-library source; lines and the strings inside JSON,
SQL and plans are real standard-library docstrings. Every builder is
deterministic and fills its budget (UTF-8 bytes) with whole units, never
cutting one: Python at a top-level statement boundary, JSON as a complete
object, SQL at a statement, a plan at a step, lines at a newline.
"""

from __future__ import annotations

import ast
import json
import random
import re
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

KB = 1024
MAX_STATEMENT = 4 * KB
_FULL = 0.98  # a builder stops once this share of its budget is filled


@dataclass(frozen=True)
class BenchInput:
    key: str  # unique row key, e.g. "JSON_FIELDS:code"
    mode: str  # the partial mode name given to parser_for
    command_field: str  # "" or the JSON field streamed into a nested parser
    label: str  # what the input is, for the table
    text: str


def nbytes(text: str) -> int:
    return len(text.encode("utf-8"))


# ---- real data --------------------------------------------------------------


def _stdlib_files() -> list[Path]:
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


@cache
def _module(path: Path) -> tuple[str, ast.Module] | None:
    try:
        text = path.read_text(encoding="utf-8")
        return text, ast.parse(text)
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return None


def _statement_chunks() -> Iterator[str]:
    """Each top-level statement of the stdlib, in file order, with the blank
    and comment lines before it and a final newline; module docstrings and
    statements over MAX_STATEMENT bytes (a few giant classes) left out, so
    that every size is a prefix of the same code."""
    for path in _stdlib_files():
        parsed = _module(path)
        if parsed is None:
            continue
        text, tree = parsed
        lines = text.splitlines(keepends=True)
        start = 0
        for i, node in enumerate(tree.body):
            end = node.end_lineno or start
            chunk = "".join(lines[start:end])
            start = max(start, end)
            docstring = (
                i == 0
                and isinstance(node, ast.Expr)
                and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)
            )
            if chunk.strip() and not docstring and nbytes(chunk) <= MAX_STATEMENT:
                yield chunk if chunk.endswith("\n") else chunk + "\n"


def _docstrings() -> Iterator[str]:
    """Docstrings of stdlib modules, classes and functions, in file order."""
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    for path in _stdlib_files():
        parsed = _module(path)
        if parsed is None:
            continue
        for node in ast.walk(parsed[1]):
            if isinstance(node, kinds):
                doc = ast.get_docstring(node)
                if doc and doc.strip():
                    yield doc


@cache
def _doc_lines() -> tuple[str, ...]:
    out: list[str] = []
    for doc in _docstrings():
        out += [line.strip() for line in doc.splitlines() if len(line.strip()) > 3]
        if len(out) > 8_000:
            break
    return tuple(out)


@cache
def _doc_sentences() -> tuple[str, ...]:
    """First sentences of docstrings: short, real phrases (queries, titles)."""
    out: list[str] = []
    for doc in _docstrings():
        first = " ".join(doc.strip().split("\n\n")[0].split())
        first = first.split(". ")[0].rstrip(".")
        if 12 <= len(first) <= 120:
            out.append(first)
        if len(out) > 1_500:
            break
    return tuple(out)


@cache
def _words() -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for line in _doc_lines():
        for w in re.findall(r"[A-Za-z][a-z]{3,12}", line):
            seen.setdefault(w.lower(), None)
        if len(seen) > 3_000:
            break
    return tuple(seen)


def _fill(
    pieces: Iterator[str],
    budget: int,
    cost: Callable[[str], int] = nbytes,
    prefix: bool = False,
) -> list[str]:
    """Takes pieces in order while they fit: with `prefix`, stops at the first
    one that does not (so a smaller budget gives a prefix of a larger one's
    text); otherwise skips it and goes on until the budget is nearly full."""
    taken: list[str] = []
    used = 0
    for piece in pieces:
        c = cost(piece)
        if used + c <= budget:
            taken.append(piece)
            used += c
            if used >= budget * _FULL:
                break
        elif prefix:
            break
    return taken


# ---- builders ---------------------------------------------------------------


def python_source(budget: int, cost: Callable[[str], int] = nbytes) -> str:
    """Concatenated real stdlib source, trimmed at a top-level statement boundary."""
    text = "".join(_fill(_statement_chunks(), budget, cost, prefix=True))
    ast.parse(text)  # still one valid module
    return text


_UNICODE = (
    "Grüße aus Köln",
    "naïve café, résumé",
    "東京の天気は晴れ",
    "Москва — столица",
    "ΑΒΓ αβγ ∑ ∞",
    "price: 5 € / 4 £",
    "launch 🚀 done ✅",
    "مرحبا بالعالم",
)


def json_arguments(budget: int) -> str:
    """A tool call's arguments object: strings with escapes and unicode,
    numbers, booleans, null, nested objects, and an array field of strings,
    grown with nested section objects and then array elements to the budget.
    Some values are written with \\u escapes (ensure_ascii), some as raw UTF-8."""
    sentences, lines = _doc_sentences(), _doc_lines()
    head = [
        ("query", sentences[0], False),
        ("language", "en-GB", False),
        ("max_results", 25, False),
        ("temperature", 0.25, False),
        ("strict", True, False),
        ("cursor", None, False),
        (
            "filters",
            {
                "since": "2024-03-01T12:00:00Z",
                "sites": ["docs.python.org", "peps.python.org"],
                "score": {"min": 0.5, "max": 1e3, "weights": [0.1, -2, 3.5e-4]},
            },
            False,
        ),
        (
            "notes",
            'Tabs\tand newlines\n, "quotes", C:\\path\\to\\file, café 日本語 😀, ESC \x1b[0m',
            True,
        ),
    ]

    def field(key: str, value: object, ascii_only: bool) -> str:
        return f"{json.dumps(key)}: {json.dumps(value, ensure_ascii=ascii_only)}"

    def sections() -> Iterator[str]:
        for i in range(len(sentences)):
            body = "\n".join(lines[(7 * i) % len(lines) : (7 * i) % len(lines) + 3])
            value = {
                "title": f"{sentences[(i + 1) % len(sentences)]} — {_UNICODE[i % len(_UNICODE)]}",
                "body": body,
                "line": 10 * i + 3,
                "weight": round(1 / (i + 1), 6),
                "tags": [w for w in _words()[i % 97 : i % 97 + 3]],
                "reviewed": i % 3 == 0,
            }
            yield field(f"section_{i + 1}", value, i % 2 == 1)

    fields = [field(*f) for f in head]
    budget_left = budget - nbytes("{" + ", ".join(fields) + "}")
    fields += _fill(sections(), budget_left // 2, lambda s: nbytes(s) + 2, prefix=True)

    def passages() -> Iterator[str]:
        for i, line in enumerate(lines):
            text = f"{line} ({_UNICODE[i % len(_UNICODE)]})" if i % 5 == 0 else line
            yield json.dumps(text, ensure_ascii=i % 2 == 0)

    prefix = "{" + ", ".join(fields) + ', "passages": ['
    items = _fill(passages(), budget - nbytes(prefix) - 2, lambda s: nbytes(s) + 2, prefix=True)
    text = prefix + ", ".join(items) + "]}"
    json.loads(text)
    return text


def json_code(budget: int) -> str:
    """`{"code": "<python source>"}`: real stdlib source, JSON-encoded."""
    frame = '{"code": ""}'
    src = python_source(budget - nbytes(frame), lambda s: nbytes(json.dumps(s)) - 2)
    return '{"code": ' + json.dumps(src) + "}"


def text_lines(budget: int) -> str:
    """Real lines of text (stdlib docstrings), one per line."""
    return "".join(_fill((line + "\n" for line in _doc_lines()), budget, prefix=True))


def sql_statements(budget: int) -> str:
    """Generated INSERT/SELECT/UPDATE statements over a notes table; string
    literals hold ';', quotes ('') and '--', and comments hold ';'."""
    rng = random.Random(20240601)
    sentences, words = _doc_sentences(), _words()

    def lit(s: str) -> str:
        return "'" + s.replace("'", "''") + "'"

    def statements() -> Iterator[str]:
        yield (
            "CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY, author TEXT, "
            "title TEXT, body TEXT, score REAL, created_at TEXT);\n"
        )
        for i in range(1, 1_000_000):
            kind = i % 4
            a, b = rng.choice(sentences), rng.choice(sentences)
            w = rng.choice(words)
            author = w.title() + " O'Brien"
            if kind in (0, 1):
                yield (
                    f"INSERT INTO notes (id, author, title, body, score, created_at) VALUES "
                    f"({i}, {lit(author)}, {lit(a + '; see below')}, "
                    f"{lit(b + ' -- not a comment; really')}, {rng.randint(0, 500) / 100}, "
                    f"'2024-{1 + i % 12:02d}-{1 + i % 28:02d} 10:{i % 60:02d}:00');\n"
                )
            elif kind == 2:
                yield (
                    f"-- notes about {w}; the ';' in this comment ends nothing\n"
                    f"SELECT n.id, n.title, length(n.body) AS size\n"
                    f"FROM notes AS n\n"
                    f"WHERE n.body LIKE {lit('%;%')} AND n.title <> {lit(w + ';')}\n"
                    f"  AND n.score >= {rng.randint(0, 40) / 10} /* threshold; tuned */\n"
                    f"ORDER BY n.created_at DESC LIMIT {rng.randint(1, 50)};\n\n"
                )
            else:
                yield f"UPDATE notes SET body = {lit(a + '; edited')} WHERE id = {i - 1};\n"

    return "".join(_fill(statements(), budget, prefix=True))


def plan_steps(budget: int) -> str:
    """An LLMCompiler-style plan: `$n = tool("...")` steps naming earlier steps."""
    sentences = _doc_sentences()

    def q(s: str) -> str:
        return s.replace("\\", "/").replace('"', "'")

    def steps() -> Iterator[str]:
        for n in range(1, 1_000_000):
            s = sentences[n % len(sentences)]
            if n % 5 in (1, 2) or n < 3:
                yield f'${n} = search("{q(s)}")\n'
            elif n % 5 == 3:
                yield f'${n} = calculator("${n - 1} * 2 + ${n - 2}")\n'
            elif n % 5 == 4:
                yield f'${n} = lookup("${n - 3}", "{q(s.split()[0])}")\n'
            else:
                yield f'${n} = summarize("{q(s)}", ${n - 1}, ${n - 4})\n'

    return "".join(_fill(steps(), budget, prefix=True))


# (key, mode, command_field, label, builder)
SPECS: tuple[tuple[str, str, str, str, Callable[[int], str]], ...] = (
    ("PYTHON_STATEMENTS", "PYTHON_STATEMENTS", "", "stdlib source", python_source),
    ("JSON_FIELDS", "JSON_FIELDS", "", "tool-call arguments", json_arguments),
    ("JSON_FIELDS:code", "JSON_FIELDS", "code", '{"code": stdlib source}', json_code),
    ("LINES", "LINES", "", "docstring lines", text_lines),
    ("SQL_STATEMENTS", "SQL_STATEMENTS", "", "INSERT/SELECT/UPDATE", sql_statements),
    ("PLAN_STEPS", "PLAN_STEPS", "", "$n = tool(...) plan", plan_steps),
    ("WHOLE", "WHOLE", "", "stdlib source", python_source),
)


FORMAT_MODE = "FORMAT"  # a row of a tool-call format: its command_field names it


def format_specs(names: list[str]) -> tuple[tuple[str, str, str, str, Callable[[int], str]], ...]:
    """A row per tool-call format: a python call of stdlib source, written
    in that format (bench/parsers/formats.py renders it)."""
    from bench.parsers.formats import RENDER

    def builder(name: str) -> Callable[[int], str]:
        return lambda budget: RENDER[name](python_source(budget))

    return tuple(
        (f"FORMAT:{n}", FORMAT_MODE, n, f"python call, {n} format", builder(n)) for n in names
    )


def all_specs() -> tuple[tuple[str, str, str, str, Callable[[int], str]], ...]:
    from bench.parsers.formats import available

    return SPECS + format_specs(available())


def build(key: str, size_kb: int) -> BenchInput:
    for k, mode, command_field, label, builder in all_specs():
        if k == key:
            return BenchInput(k, mode, command_field, label, builder(size_kb * KB))
    raise KeyError(key)
