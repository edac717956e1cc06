"""The local search tool's corpus: a SQLite FTS5 index of documentation that
ships with Python itself, built once per Python installation and cached.

Documents (title, kind, body):
- the Python documentation topics of `pydoc_data.topics` ("topic: for");
- the docstrings of the public stdlib modules and their public submodules
  ("json"), of their public functions and classes ("json.dumps"), and of the
  public methods of those classes ("json.JSONEncoder.encode"). Builtins read
  without a prefix ("len", "str.join").

Importing a few hundred modules has side effects (memory, signal handlers,
`readline` touching the terminal, `this` printing), so the build runs in a
child process (`python -I corpus.py --build-into FILE`) and the caller only
ever opens the finished file. This file therefore uses the stdlib only.

The index lives at `$CONVEYOR_CACHE_DIR/search/corpus-<python>-<hash>.sqlite`
(default `~/.cache/conveyor`); the hash covers this file's source and the
Python build, so a changed builder or interpreter gets a fresh file. It is
built into a temporary file in the same folder and moved into place with
os.replace, under an fcntl lock: concurrent gateways build it once, and a
reader never sees a half-built index.

`python -m tool_gateway.corpus` prints the index path, building it if missing.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import json
import os
import pkgutil
import sqlite3
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

from tool_gateway import built_files
from tool_gateway.built_files import BuildError, ensure_built, versioned_path

SCHEMA_VERSION = 1

# Modules not imported: they act on import (print, open a browser, start a
# GUI), are test suites, or are not documentation anyone searches for.
SKIP_MODULES = frozenset(
    {
        "antigravity",
        "this",
        "idlelib",
        "tkinter",
        "turtle",
        "turtledemo",
        "test",
        "tests",
        "lib2to3",
        "ensurepip",
        "pydoc_data",
        "msilib",  # Windows only, and deprecated
        "distutils",  # deprecated (gone in 3.12); in a venv often setuptools' copy
        "xxlimited",
        "xxlimited_35",
        "xxsubtype",
    }
)
# Packages whose submodules are generated noise (one codec per module).
NOT_WALKED = frozenset({"encodings"})
# Modules better known by another name (os.path is posixpath or ntpath).
ALIASES = {os.path.__name__: "os.path"}

# Column order matters: bm25() weights are given per column (see search_tool).
SCHEMA = """
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE VIRTUAL TABLE docs USING fts5(
    title, body, kind UNINDEXED, tokenize = 'porter unicode61 remove_diacritics 2'
);
"""


CorpusError = BuildError  # the index could not be built

# ---- where the index lives -------------------------------------------------


def index_path(root: str | os.PathLike | None = None) -> Path:
    """Where this interpreter's index is (or will be)."""
    return versioned_path(__file__, "search", "corpus", f"{SCHEMA_VERSION}", root)


def ensure_index(
    root: str | os.PathLike | None = None,
    *,
    build: Callable[[Path], None] | None = None,
) -> Path:
    """The index's path, building it first if it is missing. Blocking (call
    it in a thread from async code). `build(tmp)` fills a temporary file;
    the default runs the builder in a child process."""
    return ensure_built(index_path(root), build or build_in_child)


def build_in_child(out: Path) -> None:
    """Runs this file's builder in an isolated child interpreter."""
    built_files.build_in_child(__file__, out, "the search index")


def read_meta(path: str | os.PathLike) -> dict[str, str]:
    """The index's build facts: doc count, build seconds, Python version."""
    uri = f"{Path(path).resolve().as_uri()}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as con:
        return dict(con.execute("SELECT key, value FROM meta"))


# ---- the builder (runs in the child) ---------------------------------------


def build_into(out: Path) -> dict[str, str]:
    """Collects the documents and writes the index to `out` (a new file)."""
    started = time.perf_counter()
    warnings.simplefilter("ignore")
    modules = list(_modules())
    docs = list(_topic_docs())
    seen = {title for title, _, _ in docs}
    objects: set[int] = set()  # ids of what is documented (modules stay imported)
    for module in modules:
        for doc in _module_docs(module, objects):
            if doc[0] not in seen:
                seen.add(doc[0])
                docs.append(doc)
    con = sqlite3.connect(out)
    try:
        con.executescript(SCHEMA)
        con.executemany("INSERT INTO docs(title, kind, body) VALUES (?, ?, ?)", docs)
        con.execute("INSERT INTO docs(docs) VALUES ('optimize')")
        meta = {
            "schema": str(SCHEMA_VERSION),
            "python": sys.version.split()[0],
            "docs": str(len(docs)),
            "modules": str(len(modules)),
            "build_seconds": f"{time.perf_counter() - started:.2f}",
        }
        con.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())
        con.commit()
    finally:
        con.close()
    return meta


def _skipped(name: str) -> bool:
    parts = name.split(".")
    return any(p.startswith("_") or p in SKIP_MODULES or p.startswith("turtle") for p in parts)


def _import(name: str):
    try:
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
            return importlib.import_module(name)
    except (Exception, SystemExit):  # missing (Windows-only), broken, deprecated away
        return None


def _modules() -> Iterator:
    """The public stdlib modules that import, and their public submodules."""
    for name in sorted(sys.stdlib_module_names):
        if _skipped(name) or (module := _import(name)) is None:
            continue
        yield module
        if not hasattr(module, "__path__") or name in NOT_WALKED:
            continue
        todo = [module]
        while todo:
            package = todo.pop()
            for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
                if _skipped(info.name) or (sub := _import(info.name)) is None:
                    continue
                yield sub
                if info.ispkg:
                    todo.append(sub)


def _topic_docs() -> Iterator[tuple[str, str, str]]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions ship Python without its docs
        return
    for key, text in sorted(topics.items()):
        if text.strip():
            yield f"topic: {key}", "topic", text.strip()


def _doc(obj) -> str:
    doc = getattr(obj, "__doc__", None)
    return inspect.cleandoc(doc) if isinstance(doc, str) else ""


def _signature(title: str, obj) -> str:
    try:
        return f"{title.rsplit('.', 1)[-1]}{inspect.signature(obj)}"
    except Exception:  # builtins without text signatures, odd callables
        return ""


def _module_docs(module, objects: set[int]) -> Iterator[tuple[str, str, str]]:
    """A module's docs. An object already documented under an earlier name
    (`posix.getcwd` is `os.getcwd`, `typing.Text` is `str`) is skipped: the
    package comes before its submodules, `builtins` before the rest."""
    name = ALIASES.get(module.__name__, module.__name__)
    if doc := _doc(module):
        yield name, "module", doc
    prefix = "" if name == "builtins" else name + "."
    exported = getattr(module, "__all__", None)
    if not isinstance(exported, list | tuple):
        exported = None
    # vars(), not getattr: a module __getattr__ may import or warn lazily.
    for attr, obj in sorted(vars(module).items()):
        if attr.startswith("_") or not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        if exported is not None and attr not in exported:
            continue
        defined_in = getattr(obj, "__module__", None)
        if exported is None and defined_in not in (module.__name__, "_" + module.__name__):
            continue  # imported from elsewhere; documented where it is defined
        if id(obj) in objects:
            continue
        objects.add(id(obj))
        title = prefix + attr
        doc = _doc(obj)
        if inspect.isclass(obj):
            if doc:
                yield title, "class", _body(_signature(title, obj), doc)
            yield from _method_docs(title, obj)
        elif doc:
            yield title, "function", _body(_signature(title, obj), doc)


def _method_docs(class_title: str, cls) -> Iterator[tuple[str, str, str]]:
    for attr, obj in sorted(vars(cls).items()):
        if attr.startswith("_"):
            continue
        if isinstance(obj, property):
            kind = "attribute"
        elif inspect.isroutine(obj) or isinstance(obj, classmethod | staticmethod):
            kind = "method"
        else:
            continue
        doc = _doc(obj)
        if doc:
            title = f"{class_title}.{attr}"
            signature = "" if kind == "attribute" else _signature(title, obj)
            yield title, kind, _body(signature, doc)


def _body(signature: str, doc: str) -> str:
    if signature and not doc.startswith(signature.split("(", 1)[0] + "("):
        return f"{signature}\n\n{doc}"
    return doc


# ---- command line ----------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tool_gateway.corpus",
        description="Prints the search index's path, building the index first if it is missing.",
    )
    parser.add_argument("--info", action="store_true", help="also print the index's build facts")
    parser.add_argument("--build-into", metavar="FILE", help=argparse.SUPPRESS)  # the child
    args = parser.parse_args(argv)
    if args.build_into:
        print(json.dumps(build_into(Path(args.build_into))))
        return 0
    try:
        path = ensure_index()
    except CorpusError as e:
        print(e, file=sys.stderr)
        return 1
    print(path)
    if args.info:
        print(json.dumps(read_meta(path)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
