"""The `database` tool: read-only SQL on a SQLite database.

Each session is one SQLite connection to the database file, opened with a
`mode=ro` URI and guarded by an authorizer that lets through reads only
(SELECT, WITH, VALUES, EXPLAIN and a few read-only PRAGMAs): writes, ATTACH,
temporary tables, transactions and PRAGMA writes are refused before they run.
The default database is the sample one of `tool_gateway.sample_db` (real
data about the Python standard library and Unicode), built once and cached.

A unit is one statement (the scheduler's SQL_STATEMENTS parser splits the
`sql` argument at each `;`); a unit that holds several runs them in order and
stops at the first error. SQLite work runs in a worker thread, one statement
at a time per session. A progress handler stops a statement that runs past the
statement timeout, and `cancel()` interrupts the running statement at once
(sqlite3_interrupt); either way the connection stays usable. A failed
statement (syntax, unknown table, refused, timed out) is a unit outcome with
ok=False; the next unit still runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tool_gateway.config import GatewayConfig
from tool_gateway.metrics import SESSIONS
from tool_gateway.tools.base import (
    PartialMode,
    Tool,
    ToolErrorCode,
    ToolFailure,
    ToolSession,
    ToolSpec,
    Unit,
    UnitOutcome,
)

DEFAULT_STATEMENT_TIMEOUT_S = 5.0
DEFAULT_MAX_ROWS = 200
MAX_CELL_CHARS = 100  # a longer value is cut in the table (substr() reads the rest)
MAX_VALUE_CHARS = 32 * 1024  # the whole table of one unit
MAX_VALUE_BYTES = 16 << 20  # SQLITE_LIMIT_LENGTH: the largest string or blob a query may make
PROGRESS_STEPS = 10_000  # VM instructions between deadline checks (well under 1 ms)
INTERRUPT_GRACE_S = 0.5  # after the deadline, interrupt from outside as a backstop

# PRAGMAs that only read, allowed with an argument (a table or index name).
READ_PRAGMAS_WITH_ARGUMENT = frozenset(
    {"table_info", "table_xinfo", "index_list", "index_info", "index_xinfo", "foreign_key_list"}
)
# PRAGMAs that read a setting or a list: allowed only without a value (a
# value would be a write: `PRAGMA user_version = 3`).
READ_PRAGMAS = frozenset(
    {
        "table_list",
        "collation_list",
        "function_list",
        "module_list",
        "pragma_list",
        "compile_options",
        "encoding",
        "page_count",
        "page_size",
        "freelist_count",
        "user_version",
        "application_id",
        "schema_version",
        "data_version",
    }
)
ALLOWED_SUMMARY = (
    "The database is read-only: only queries (SELECT, WITH, VALUES, EXPLAIN) and "
    "read-only PRAGMAs (table_info, index_list, foreign_key_list, table_list, ...) may run."
)
# The statement kinds a refusal names (what the model wrote, not SQLite's internals).
_READING_KINDS = frozenset({"SELECT", "WITH", "VALUES", "EXPLAIN", "PRAGMA"})
_STATEMENT_KIND = re.compile(
    r"\s*(CREATE\s+(?:TEMP\w*\s+)?(?:UNIQUE\s+|VIRTUAL\s+)?\w+|DROP\s+\w+|ALTER\s+TABLE|"
    r"INSERT\s+OR\s+\w+|\w+)",
    re.IGNORECASE,
)

_ACTION_NAMES = {
    getattr(sqlite3, name): name.removeprefix("SQLITE_").replace("_", " ")
    for name in (
        "SQLITE_CREATE_INDEX",
        "SQLITE_CREATE_TABLE",
        "SQLITE_CREATE_TEMP_INDEX",
        "SQLITE_CREATE_TEMP_TABLE",
        "SQLITE_CREATE_TEMP_TRIGGER",
        "SQLITE_CREATE_TEMP_VIEW",
        "SQLITE_CREATE_TRIGGER",
        "SQLITE_CREATE_VIEW",
        "SQLITE_DELETE",
        "SQLITE_DROP_INDEX",
        "SQLITE_DROP_TABLE",
        "SQLITE_DROP_TEMP_INDEX",
        "SQLITE_DROP_TEMP_TABLE",
        "SQLITE_DROP_TEMP_TRIGGER",
        "SQLITE_DROP_TEMP_VIEW",
        "SQLITE_DROP_TRIGGER",
        "SQLITE_DROP_VIEW",
        "SQLITE_INSERT",
        "SQLITE_PRAGMA",
        "SQLITE_READ",
        "SQLITE_SELECT",
        "SQLITE_TRANSACTION",
        "SQLITE_UPDATE",
        "SQLITE_ATTACH",
        "SQLITE_DETACH",
        "SQLITE_ALTER_TABLE",
        "SQLITE_REINDEX",
        "SQLITE_ANALYZE",
        "SQLITE_CREATE_VTABLE",
        "SQLITE_DROP_VTABLE",
        "SQLITE_FUNCTION",
        "SQLITE_SAVEPOINT",
        "SQLITE_RECURSIVE",
    )
    if hasattr(sqlite3, name)
}
_SQLITE_RECURSIVE = getattr(sqlite3, "SQLITE_RECURSIVE", 33)
_ALWAYS_ALLOWED = frozenset(
    {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, _SQLITE_RECURSIVE}
)
# Functions that reach outside the database (disabled anyway; refused by name too).
DENIED_FUNCTIONS = frozenset({"load_extension"})

_COMMENTS = re.compile(r"--[^\n]*|/\*.*?(\*/|$)", re.DOTALL)

SAMPLE_DESCRIPTION = """\
Runs read-only SQL (SQLite 3 dialect) on a database about the Python {python} standard \
library (its .py modules, test suites left out) and the Unicode character database. \
Give one or more statements separated by ';': each result comes back as a text table \
(at most {max_rows} rows per statement: aggregate or add LIMIT). Writes are refused; \
each statement is stopped after {timeout:g} s. The `tokens` table is large: filter or \
join it through its indexes. Tables:
- modules(id, name, package, path, is_package, lines, blank_lines, bytes, docstring): \
one row per module; name is dotted ('json.decoder', a package's __init__ is 'json'), \
package is the top-level name ('json'), lines and blank_lines count physical lines.
- definitions(id, module_id -> modules.id, parent_id -> definitions.id, kind, name, \
qualname, is_async, lineno, end_lineno, arg_count, decorators, docstring): every class \
and function; kind is 'class', 'method' (defined directly in a class) or 'function'; \
parent_id is the enclosing class or function (NULL at module level); qualname is \
dotted ('JSONDecoder.decode'); arg_count counts all parameters incl. self, *args, \
**kwargs (NULL for classes); decorators is their source joined by ', ' (NULL if none).
- imports(id, module_id -> modules.id, lineno, imported, name, alias, level): one row \
per imported name; imported is the absolute module read from (relative imports \
resolved, so it joins modules.name); name is the name in 'from X import name' (NULL \
for 'import X'); level is 0 for absolute imports.
- tokens(id, module_id -> modules.id, definition_id -> definitions.id, line, col, type, \
text): every token of every module in order (~1.7 million rows); type is NAME, OP, \
NUMBER, STRING, COMMENT, NEWLINE, NL, INDENT or DEDENT (keywords are NAME); \
definition_id is the innermost class or function whose lines hold the token (NULL at \
module level).
- unicode_chars(codepoint, char, name, category, bidirectional, combining, \
east_asian_width, mirrored, decimal, digit, numeric, decomposition): every named code \
point (Unicode {unicode}); category is the general category ('Lu', 'Nd', ...).
- about(key, value): facts of the build (row counts, versions).
Indexes: modules(name), modules(package), definitions(module_id), \
definitions(parent_id), definitions(name), imports(module_id), imports(imported), \
tokens(module_id, line), tokens(definition_id), tokens(text), unicode_chars(category). \
Text values longer than {cell} characters are cut in the output (use substr() to read \
the rest)."""

GENERIC_DESCRIPTION = """\
Runs read-only SQL (SQLite 3 dialect) on a database. Give one or more statements \
separated by ';': each result comes back as a text table (at most {max_rows} rows per \
statement: aggregate or add LIMIT). Writes are refused; each statement is stopped \
after {timeout:g} s. Read the schema with: SELECT sql FROM sqlite_schema."""

PARAMETERS = {
    "type": "object",
    "properties": {
        "sql": {
            "type": "string",
            "description": "One or more SQLite statements, each ended by ';'.",
        }
    },
    "required": ["sql"],
}


def make_spec(*, sample: bool, statement_timeout: float, max_rows: int) -> ToolSpec:
    if sample:
        import unicodedata

        description = SAMPLE_DESCRIPTION.format(
            python=".".join(map(str, sys.version_info[:2])),
            unicode=unicodedata.unidata_version,
            max_rows=max_rows,
            timeout=statement_timeout,
            cell=MAX_CELL_CHARS,
        )
    else:
        description = GENERIC_DESCRIPTION.format(max_rows=max_rows, timeout=statement_timeout)
    return ToolSpec(
        name="database",
        description=description,
        parameters=PARAMETERS,
        partial_mode=PartialMode.SQL_STATEMENTS,
        partial_safe=True,  # read-only: running a statement early changes nothing
        command_field="sql",
    )


class DatabaseTool(Tool):
    def __init__(
        self,
        db_path: str | None = None,
        statement_timeout: float = DEFAULT_STATEMENT_TIMEOUT_S,
        max_rows: int = DEFAULT_MAX_ROWS,
    ):
        """`db_path` None: the sample database, built on first use if missing."""
        if statement_timeout <= 0 or max_rows <= 0:
            raise ValueError("statement_timeout and max_rows must be positive")
        self.statement_timeout = statement_timeout
        self.max_rows = max_rows
        self._db_path = db_path
        self._locating: asyncio.Task[str] | None = None
        self.spec = make_spec(
            sample=db_path is None, statement_timeout=statement_timeout, max_rows=max_rows
        )

    @classmethod
    async def from_config(cls, config: GatewayConfig) -> DatabaseTool:
        """From a GatewayConfig: `database_path` (empty: the sample database,
        located or built here, in a thread). The statement timeout is at most
        the gateway's unit timeout."""
        path = getattr(config, "database_path", "") or None
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"--database-path {path!r}: no such file")
        timeout = getattr(config, "database_timeout", 0) or DEFAULT_STATEMENT_TIMEOUT_S
        timeout = min(timeout, getattr(config, "unit_timeout", timeout))
        max_rows = getattr(config, "database_max_rows", 0) or DEFAULT_MAX_ROWS
        tool = cls(path, timeout, max_rows)
        await tool.db_path()
        return tool

    async def db_path(self) -> str:
        """The database file, building the sample one first if needed."""
        if self._db_path is None:
            if self._locating is None:
                self._locating = asyncio.create_task(_locate_sample())
            # Shielded: a caller that stops waiting must not stop the build others await.
            self._db_path = await asyncio.shield(self._locating)
        return self._db_path

    async def open_session(self, session_key: str) -> DatabaseSession:
        try:
            path = await self.db_path()
        except Exception as e:
            self._locating = None  # try again on the next call
            raise ToolFailure(
                ToolErrorCode.INTERNAL, f"the sample database is unavailable: {e}"
            ) from e
        session = DatabaseSession(self)
        try:
            await asyncio.to_thread(session.connect, path)
        except sqlite3.Error as e:
            raise ToolFailure(
                ToolErrorCode.INTERNAL, f"could not open the database {path}: {e}"
            ) from e
        SESSIONS.labels(self.spec.name).inc()
        return session


async def _locate_sample() -> str:
    from tool_gateway.sample_db import ensure_sample_db

    return str(await asyncio.to_thread(ensure_sample_db))


class DatabaseSession(ToolSession):
    def __init__(self, tool: DatabaseTool):
        self._tool = tool
        self._conn: sqlite3.Connection | None = None
        self._lock = asyncio.Lock()  # one unit at a time on the connection
        self._work: asyncio.Future | None = None  # the thread running a unit
        self._closed = False
        # Shared with the worker thread (plain attributes: the GIL orders them).
        self._deadline = float("inf")
        self._cancelled = False
        self._timed_out = False
        self._denied: list[str] = []

    @property
    def alive(self) -> bool:
        return not self._closed

    # ---- the connection (worker thread) -----------------------------------

    def connect(self, path: str) -> None:
        uri = f"{Path(path).resolve().as_uri()}?mode=ro"
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
        try:
            if hasattr(conn, "setlimit"):  # Python 3.11+
                conn.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
                conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, MAX_VALUE_BYTES)
            conn.execute("PRAGMA query_only = ON")
            # An eponymous virtual table (pragma_table_info(...)) is set up on its
            # first use with an internal write check on sqlite_schema, which the
            # authorizer would refuse: set them up now, once per connection.
            for pragma in sorted(READ_PRAGMAS_WITH_ARGUMENT | READ_PRAGMAS):
                with contextlib.suppress(sqlite3.Error):  # absent from this SQLite build
                    conn.execute(f"SELECT * FROM pragma_{pragma} LIMIT 0").fetchall()
            conn.set_authorizer(self._authorize)
            conn.set_progress_handler(self._progress, PROGRESS_STEPS)
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _authorize(self, action: int, arg1, arg2, db_name, trigger) -> int:
        if action in _ALWAYS_ALLOWED:
            if action == sqlite3.SQLITE_FUNCTION and str(arg2).lower() in DENIED_FUNCTIONS:
                self._denied.append(f"the function {arg2}() is not allowed")
                return sqlite3.SQLITE_DENY
            return sqlite3.SQLITE_OK
        if action == sqlite3.SQLITE_PRAGMA:
            name = str(arg1).lower()
            if name in READ_PRAGMAS_WITH_ARGUMENT or (name in READ_PRAGMAS and arg2 is None):
                return sqlite3.SQLITE_OK
            what = f"PRAGMA {arg1}" + (f" = {arg2}" if arg2 is not None else "")
            self._denied.append(f"{what} is not allowed")
            return sqlite3.SQLITE_DENY
        what = _ACTION_NAMES.get(action, f"action {action}")
        target = next((str(a) for a in (arg1, arg2) if a), "")
        if target:
            what += f" ({target})"
        self._denied.append(f"{what} is not allowed")
        return sqlite3.SQLITE_DENY

    def _progress(self) -> int:
        """Called by SQLite every PROGRESS_STEPS instructions: nonzero stops the statement."""
        if self._cancelled:
            return 1
        if time.monotonic() > self._deadline:
            self._timed_out = True
            return 1
        return 0

    def _run_text(self, text: str, index: int) -> UnitOutcome:
        """Runs a unit's statements in order (worker thread); never raises."""
        started = time.perf_counter()
        blocks: list[str] = []
        truncated = False
        error = ""
        statements = [s for s in split_statements(text) if not is_blank(s)]
        for n, statement in enumerate(statements):
            try:
                block, cut = self._run_statement(statement)
            except Exception as e:
                error = self._explain(e, statement)
                if n + 1 < len(statements):
                    left = len(statements) - n - 1
                    error += f" ({left} later statement{'s' * (left > 1)} in this unit not run)"
                break
            blocks.append(block)
            truncated |= cut
        value = "\n\n".join(blocks) if blocks or error else "(no statement)"
        if len(value) > MAX_VALUE_CHARS:
            value = value[:MAX_VALUE_CHARS] + "\n[... output cut: truncated]"
            truncated = True
        return UnitOutcome(
            index=index,
            ok=not error,
            value=value,
            exception=error,
            duration_seconds=time.perf_counter() - started,
            truncated=truncated,
        )

    def _run_statement(self, statement: str) -> tuple[str, bool]:
        assert self._conn is not None
        self._denied = []
        cursor = self._conn.cursor()
        try:
            cursor.execute(statement)
            if cursor.description is None:
                return "(done; the statement returns no rows)", False
            columns = [d[0] for d in cursor.description]
            rows = cursor.fetchmany(self._tool.max_rows + 1)
        finally:
            cursor.close()  # stops the statement: rows past the cap are never computed
        cut = len(rows) > self._tool.max_rows
        return format_table(columns, rows[: self._tool.max_rows], cut), cut

    def _explain(self, e: Exception, statement: str) -> str:
        """The error as the model should read it."""
        if self._timed_out:
            return (
                f"TimeoutError: the statement ran past the {self._tool.statement_timeout:g} s "
                "statement timeout and was stopped; make it cheaper (filter through an index, "
                "aggregate, add LIMIT)"
            )
        if self._cancelled:
            return "Cancelled: the statement was interrupted"
        if self._denied:
            return f"{type(e).__name__}: not authorized: {self._refusal(statement)}"
        return f"{type(e).__name__}: {e}"

    def _refusal(self, statement: str) -> str:
        reason = self._denied[0]
        match = _STATEMENT_KIND.match(_COMMENTS.sub(" ", statement))
        kind = " ".join(match.group(1).upper().split()) if match else ""
        if kind and kind.split()[0] not in _READING_KINDS:
            reason = f"{kind} is refused ({reason})"
        return f"{reason}. {ALLOWED_SUMMARY}"

    # ---- the session (event loop) ------------------------------------------

    async def run_unit(self, unit: Unit) -> UnitOutcome:
        async with self._lock:
            if self._closed or self._conn is None:
                raise ToolFailure(ToolErrorCode.INTERNAL, "the database session is closed")
            await self._settle()
            self._cancelled = self._timed_out = False
            timeout = self._tool.statement_timeout
            self._deadline = time.monotonic() + timeout
            work = asyncio.ensure_future(asyncio.to_thread(self._run_text, unit.text, unit.index))
            self._work = work
            try:
                # Neither wait() nor shield() cancels `work` when this task is
                # cancelled: the interrupted thread is waited for in _settle.
                done, _ = await asyncio.wait({work}, timeout=timeout + INTERRUPT_GRACE_S)
                if not done:  # stuck where the progress handler is not called: interrupt
                    self._timed_out = True
                    self._conn.interrupt()
                return await asyncio.shield(work)
            except asyncio.CancelledError:
                self._interrupt()
                raise

    async def finish(self, full_text: str, outcomes: Sequence[UnitOutcome]) -> str:
        return summarize(outcomes)

    async def cancel(self) -> None:
        self._interrupt()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._interrupt()
        await self._settle()
        if self._conn is not None:
            self._conn.close()
            self._conn = None
            SESSIONS.labels(self._tool.spec.name).dec()

    def _interrupt(self) -> None:
        """Stops the running statement now (safe from any thread)."""
        self._cancelled = True
        if self._conn is not None:
            self._conn.interrupt()

    async def _settle(self) -> None:
        """Waits for an interrupted unit's thread to let go of the connection."""
        work, self._work = self._work, None
        if work is not None and not work.done():
            await asyncio.wait({work})


# ---- text ---------------------------------------------------------------------


def split_statements(text: str) -> list[str]:
    """Splits at each `;` that ends a complete statement (not one inside a
    string, identifier, comment or trigger body); a last statement without
    `;` is kept."""
    parts: list[str] = []
    start = 0
    for i, ch in enumerate(text):
        if ch == ";" and sqlite3.complete_statement(text[start : i + 1]):
            parts.append(text[start : i + 1])
            start = i + 1
    if text[start:].strip():
        parts.append(text[start:])
    return parts


def is_blank(statement: str) -> bool:
    """Nothing but whitespace, comments and `;`."""
    return not _COMMENTS.sub("", statement).strip(" \t\r\n;")


def format_cell(value) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, float):
        text = f"{value:.10g}"
    elif isinstance(value, bytes):
        text = f"x'{value[: MAX_CELL_CHARS // 2].hex()}'"
        if len(value) > MAX_CELL_CHARS // 2:
            return text + "…"
    else:
        text = str(value)
    text = text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    if len(text) > MAX_CELL_CHARS:
        text = text[: MAX_CELL_CHARS - 1] + "…"
    return text


def format_table(columns: Sequence[str], rows: Sequence[tuple], truncated: bool) -> str:
    """A compact text table: header, rule, one line per row, row count."""
    header = [format_cell(c) for c in columns]
    cells = [[format_cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(header)]

    def line(values: list[str]) -> str:
        return " | ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)).rstrip()

    lines = [line(header), "-+-".join("-" * w for w in widths)]
    lines += (line(r) for r in cells)
    if truncated:
        lines.append(
            f"({len(rows)} rows shown; the result has more and was truncated: "
            "aggregate or add LIMIT)"
        )
    else:
        lines.append(f"({len(rows)} row{'' if len(rows) == 1 else 's'})")
    return "\n".join(lines)


def summarize(outcomes: Sequence[UnitOutcome]) -> str:
    """The tool message for the model: each statement's table or error, in order."""
    blocks: list[str] = []
    for o in outcomes:
        parts = [o.value] if o.value else []
        if not o.ok:
            parts.append(f"Error: {o.exception}")
        text = "\n".join(parts) or "(no output)"
        blocks.append(f"-- statement {o.index + 1}\n{text}" if len(outcomes) > 1 else text)
    return "\n\n".join(blocks) if blocks else "(no statements)"
