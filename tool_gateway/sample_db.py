"""The database tool's sample database: real data about the Python standard
library and the Unicode character database, built once per Python
installation and cached. Nothing is downloaded: every row comes from files and
tables that ship with the interpreter.

Tables (see SCHEMA; the tool's description repeats it for the model):
- modules: one row per stdlib module (.py file), test suites left out;
- definitions: every class, function and method in them (from `ast`);
- imports: every import statement, relative ones resolved (from `ast`);
- tokens: every token of their source (from `tokenize`), with the innermost
  definition that holds it; about 1.7 million rows, so joins and aggregates
  over it take real time;
- unicode_chars: every named Unicode code point (from `unicodedata`);
- about: key/value facts of the build (Python version, row counts, seconds).

The file lives at `$CONVEYOR_CACHE_DIR/database/sample-<python>-<hash>.sqlite`
(default `~/.cache/conveyor`); the hash covers this file's source and the
Python build, so a changed builder or interpreter gets a fresh file. It is
built into a temporary file in the same folder and moved into place with
os.replace, under an fcntl lock: concurrent gateways build it once, and a
reader never sees a half-built file. The builder runs in a child interpreter
(`python -I sample_db.py --build-into FILE`): parsing ~800 files holds the GIL
for seconds, which the gateway's event loop should not share. This file
therefore uses the stdlib only.

`python -m tool_gateway.sample_db` builds it if missing and prints the path,
the row counts and the build seconds.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import os
import sqlite3
import sys
import sysconfig
import time
import tokenize
import unicodedata
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

from tool_gateway import built_files
from tool_gateway.built_files import BuildError, ensure_built, versioned_path

SCHEMA_VERSION = 1

# Directories of the stdlib that are not part of the sample: test suites
# (some hold deliberately broken files) and installed third-party packages.
SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__"})
# Token types that carry nothing: the file's encoding and its end.
SKIP_TOKENS = frozenset({tokenize.ENCODING, tokenize.ENDMARKER})

SCHEMA = """
CREATE TABLE about (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE modules (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    package TEXT NOT NULL,
    path TEXT NOT NULL,
    is_package INTEGER NOT NULL,
    lines INTEGER NOT NULL,
    blank_lines INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    docstring TEXT
);
CREATE TABLE definitions (
    id INTEGER PRIMARY KEY,
    module_id INTEGER NOT NULL REFERENCES modules(id),
    parent_id INTEGER REFERENCES definitions(id),
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    qualname TEXT NOT NULL,
    is_async INTEGER NOT NULL,
    lineno INTEGER NOT NULL,
    end_lineno INTEGER NOT NULL,
    arg_count INTEGER,
    decorators TEXT,
    docstring TEXT
);
CREATE TABLE imports (
    id INTEGER PRIMARY KEY,
    module_id INTEGER NOT NULL REFERENCES modules(id),
    lineno INTEGER NOT NULL,
    imported TEXT NOT NULL,
    name TEXT,
    alias TEXT,
    level INTEGER NOT NULL
);
CREATE TABLE tokens (
    id INTEGER PRIMARY KEY,
    module_id INTEGER NOT NULL REFERENCES modules(id),
    definition_id INTEGER REFERENCES definitions(id),
    line INTEGER NOT NULL,
    col INTEGER NOT NULL,
    type TEXT NOT NULL,
    text TEXT NOT NULL
);
CREATE TABLE unicode_chars (
    codepoint INTEGER PRIMARY KEY,
    char TEXT NOT NULL,
    name TEXT NOT NULL,
    category TEXT NOT NULL,
    bidirectional TEXT NOT NULL,
    combining INTEGER NOT NULL,
    east_asian_width TEXT NOT NULL,
    mirrored INTEGER NOT NULL,
    decimal INTEGER,
    digit INTEGER,
    numeric REAL,
    decomposition TEXT
);
"""

# Made after the rows are in: one sort per index instead of a b-tree insert per row.
INDEXES = """
CREATE INDEX modules_package ON modules(package);
CREATE INDEX definitions_module ON definitions(module_id);
CREATE INDEX definitions_parent ON definitions(parent_id);
CREATE INDEX definitions_name ON definitions(name);
CREATE INDEX imports_module ON imports(module_id);
CREATE INDEX imports_imported ON imports(imported);
CREATE INDEX tokens_module_line ON tokens(module_id, line);
CREATE INDEX tokens_definition ON tokens(definition_id);
CREATE INDEX tokens_text ON tokens(text);
CREATE INDEX unicode_chars_category ON unicode_chars(category);
"""

TABLES = ("modules", "definitions", "imports", "tokens", "unicode_chars")


SampleDbError = BuildError  # the sample database could not be built


# ---- where the file lives --------------------------------------------------


def sample_db_path(root: str | os.PathLike | None = None) -> Path:
    """Where this interpreter's sample database is (or will be)."""
    extra = f"{SCHEMA_VERSION}|{unicodedata.unidata_version}"
    return versioned_path(__file__, "database", "sample", extra, root)


def ensure_sample_db(
    root: str | os.PathLike | None = None,
    *,
    build: Callable[[Path], None] | None = None,
) -> Path:
    """The sample database's path, building it first if it is missing.
    Blocking (call it in a thread from async code). `build(tmp)` fills a
    temporary file; the default runs the builder in a child process. The
    file is read-only for everyone: the tool never writes it, nor should anyone."""
    return ensure_built(sample_db_path(root), build or build_in_child, mode=0o444)


def build_in_child(out: Path) -> None:
    """Runs this file's builder in an isolated child interpreter."""
    built_files.build_in_child(__file__, out, "the sample database")


def read_about(path: str | os.PathLike) -> dict[str, str]:
    """The build's facts: row counts, build seconds, Python version."""
    uri = f"{Path(path).resolve().as_uri()}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as con:
        return dict(con.execute("SELECT key, value FROM about"))


# ---- the builder (runs in the child) ---------------------------------------


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path) -> list[Path]:
    """The stdlib's .py files outside test suites, in a stable order."""
    found: list[Path] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
        found += (Path(folder) / f for f in sorted(files) if f.endswith(".py"))
    return found


def module_name(relative: Path) -> tuple[str, bool]:
    """`json/decoder.py` -> ("json.decoder", False); `json/__init__.py` -> ("json", True)."""
    parts = list(relative.with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts.pop()
    return ".".join(parts), is_package


class _Module:
    """One source file, parsed: the rows it contributes."""

    def __init__(self, path: Path, relative: Path, module_id: int, first_def_id: int):
        self.name, self.is_package = module_name(relative)
        self.relative = relative.as_posix()
        self.id = module_id
        with tokenize.open(path) as f:  # honours the file's encoding cookie
            self.source = f.read()
        self.tree = ast.parse(self.source, str(path))
        self.tokens = list(tokenize.generate_tokens(io.StringIO(self.source).readline))
        self.definitions: list[tuple] = []
        self.imports: list[tuple] = []
        self._first_def = self._next_def = first_def_id
        self._walk(self.tree, None, None, "")

    @property
    def next_def_id(self) -> int:
        return self._next_def

    def module_row(self) -> tuple:
        lines = self.source.splitlines()
        return (
            self.id,
            self.name,
            self.name.split(".")[0],
            self.relative,
            int(self.is_package),
            len(lines),
            sum(1 for line in lines if not line.strip()),
            len(self.source.encode("utf-8")),
            ast.get_docstring(self.tree, clean=True),
        )

    def _walk(self, node: ast.AST, parent_id: int | None, parent: ast.AST | None, prefix: str):
        """Collects definitions (pre-order: a parent's id is below its
        children's) and imports, anywhere in the tree."""
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                def_id = self._next_def
                self._next_def += 1
                self.definitions.append(self._definition_row(child, def_id, parent_id, parent))
                self._walk(child, def_id, child, f"{prefix}{child.name}.")
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    self.imports.append((self.id, child.lineno, alias.name, None, alias.asname, 0))
            elif isinstance(child, ast.ImportFrom):
                imported = self._resolve(child.module, child.level)
                for alias in child.names:
                    self.imports.append(
                        (self.id, child.lineno, imported, alias.name, alias.asname, child.level)
                    )
            self._walk(child, parent_id, parent, prefix)

    def _definition_row(self, node, def_id: int, parent_id: int | None, parent) -> tuple:
        if isinstance(node, ast.ClassDef):
            kind, arg_count = "class", None
        else:
            kind = "method" if isinstance(parent, ast.ClassDef) else "function"
            a = node.args
            arg_count = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs)
            arg_count += (a.vararg is not None) + (a.kwarg is not None)
        decorators = ", ".join(ast.unparse(d) for d in node.decorator_list) or None
        qualname = self._qualname(parent_id, node.name)
        return (
            def_id,
            self.id,
            parent_id,
            kind,
            node.name,
            qualname,
            int(isinstance(node, ast.AsyncFunctionDef)),
            node.lineno,
            node.end_lineno,
            arg_count,
            decorators,
            ast.get_docstring(node, clean=True),
        )

    def _qualname(self, parent_id: int | None, name: str) -> str:
        if parent_id is None:
            return name
        parent_row = self.definitions[parent_id - self._first_def]
        return f"{parent_row[5]}.{name}"

    def _resolve(self, module: str | None, level: int) -> str:
        """The absolute name a `from` import reads from."""
        if level == 0:
            return module or ""
        package = self.name.split(".") if self.is_package else self.name.split(".")[:-1]
        base = package[: len(package) - (level - 1)] if level > 1 else package
        parts = [*base, module] if module else base
        return ".".join(p for p in parts if p)

    def token_rows(self) -> Iterator[tuple]:
        # The innermost definition of each line: pre-order, so children overwrite parents.
        owner: list[int | None] = [None] * (self.source.count("\n") + 2)
        for row in self.definitions:
            start, end = row[7], min(row[8], len(owner) - 1)
            owner[start : end + 1] = [row[0]] * (end + 1 - start)
        names = tokenize.tok_name
        for tok in self.tokens:
            if tok.type in SKIP_TOKENS:
                continue
            line, col = tok.start
            yield (
                self.id,
                owner[line] if line < len(owner) else None,
                line,
                col,
                names[tok.type],
                tok.string,
            )


def _unicode_rows() -> Iterator[tuple]:
    for codepoint in range(sys.maxunicode + 1):
        ch = chr(codepoint)
        name = unicodedata.name(ch, None)
        if name is None:  # unassigned, private use, surrogates, controls
            continue
        yield (
            codepoint,
            ch,
            name,
            unicodedata.category(ch),
            unicodedata.bidirectional(ch),
            unicodedata.combining(ch),
            unicodedata.east_asian_width(ch),
            unicodedata.mirrored(ch),
            unicodedata.decimal(ch, None),
            unicodedata.digit(ch, None),
            unicodedata.numeric(ch, None),
            unicodedata.decomposition(ch) or None,
        )


def build_into(out: Path, root: Path | None = None) -> dict[str, str]:
    """Parses the stdlib and writes the database to `out` (a new or empty file)."""
    started = time.perf_counter()
    warnings.simplefilter("ignore")  # SyntaxWarnings of old escape sequences
    root = root or stdlib_root()
    con = sqlite3.connect(out, isolation_level=None)
    try:
        con.execute("PRAGMA journal_mode = OFF")
        con.execute("PRAGMA synchronous = OFF")
        con.executescript(SCHEMA)
        con.execute("BEGIN")
        module_id, def_id, skipped = 1, 1, []
        for path in stdlib_files(root):
            relative = path.relative_to(root)
            try:
                module = _Module(path, relative, module_id, def_id)
            except (SyntaxError, ValueError, UnicodeDecodeError, tokenize.TokenError) as e:
                skipped.append(f"{relative}: {e}")
                continue
            row = module.module_row()
            con.execute("INSERT INTO modules VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
            con.executemany(
                "INSERT INTO definitions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                module.definitions,
            )
            con.executemany(
                "INSERT INTO imports (module_id, lineno, imported, name, alias, level) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                module.imports,
            )
            con.executemany(
                "INSERT INTO tokens (module_id, definition_id, line, col, type, text) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                module.token_rows(),
            )
            module_id, def_id = module_id + 1, module.next_def_id
        con.executemany(
            "INSERT INTO unicode_chars VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", _unicode_rows()
        )
        con.executescript(INDEXES)  # ends the transaction first (executescript commits)
        con.execute("ANALYZE")  # statistics, so the planner picks good join orders
        about = {
            "schema": str(SCHEMA_VERSION),
            "python": sys.version.split()[0],
            "unicode": unicodedata.unidata_version,
            "stdlib": str(root),
        }
        for table in TABLES:
            about[f"rows.{table}"] = str(con.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
        about["skipped_files"] = str(len(skipped))
        about["build_seconds"] = f"{time.perf_counter() - started:.2f}"
        con.executemany("INSERT INTO about VALUES (?, ?)", about.items())
    finally:
        con.close()
    return about


def main() -> None:
    parser = argparse.ArgumentParser(description="Build the database tool's sample database")
    parser.add_argument("--build-into", help=argparse.SUPPRESS)  # the child's entry
    parser.add_argument("--cache-dir", default="", help="default: $CONVEYOR_CACHE_DIR")
    args = parser.parse_args()
    if args.build_into:
        build_into(Path(args.build_into))
        return
    path = ensure_sample_db(args.cache_dir or None)
    about = read_about(path)
    print(path)
    for table in TABLES:
        print(f"  {table:<14} {int(about[f'rows.{table}']):>10,} rows")
    print(f"  built in {about['build_seconds']} s (Python {about['python']})")


if __name__ == "__main__":
    main()
