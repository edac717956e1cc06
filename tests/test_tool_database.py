"""The `database` tool: its sample database builder, and the tool itself
through the gateway's gRPC API (in-process on port 0)."""

from __future__ import annotations

import ast
import asyncio
import hashlib
import io
import json.decoder
import sqlite3
import stat
import sys
import tokenize
import unicodedata
from pathlib import Path

import grpc
import pytest
from conveyor.v1 import common_pb2, tool_gateway_pb2, tool_gateway_pb2_grpc

from conveyor_common.server import stop_server
from scheduler.parsers import arguments_parser_for
from tests.test_gateway import Stream, last, results
from tool_gateway import built_files, sample_db
from tool_gateway.config import GatewayConfig
from tool_gateway.registry import ToolRegistry
from tool_gateway.server import create_server
from tool_gateway.tools.database_tool import DatabaseTool

pb = tool_gateway_pb2
MAX_ROWS = 25
# Generous: correct queries share this gateway and must not time out on a
# busy machine; the slow query still stops long before its end.
TIMEOUT_S = 5.0
SLOW_SQL = (
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 1000000000) "
    "SELECT count(*) FROM c;"
)


# ---- fixtures -------------------------------------------------------------------


@pytest.fixture(scope="module")
def sample_path() -> Path:
    """The sample database, built once (in $CONVEYOR_CACHE_DIR or ~/.cache/conveyor)."""
    return sample_db.ensure_sample_db()


async def _serve(tool: DatabaseTool):
    server, port = await create_server(
        GatewayConfig(), "127.0.0.1", 0, registry=ToolRegistry([tool])
    )
    return server, port


@pytest.fixture(scope="module")
async def gateway(sample_path):
    """A gateway whose database tool stops statements after TIMEOUT_S."""
    tool = DatabaseTool(statement_timeout=TIMEOUT_S, max_rows=MAX_ROWS)  # the sample database
    server, port = await _serve(tool)
    yield port, tool
    await stop_server(server, 0)


@pytest.fixture(scope="module")
async def patient_gateway(sample_path):
    """A gateway whose statement timeout is long: only a cancel stops a slow query."""
    server, port = await _serve(DatabaseTool(str(sample_path), statement_timeout=60.0))
    yield port
    await stop_server(server, 0)


async def _stub(port: int):
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    return channel, tool_gateway_pb2_grpc.ToolGatewayServiceStub(channel)


@pytest.fixture
async def stub(gateway):
    channel, stub = await _stub(gateway[0])
    async with channel:
        yield stub


@pytest.fixture
async def patient_stub(patient_gateway):
    channel, stub = await _stub(patient_gateway)
    async with channel:
        yield stub


class SqlStream(Stream):
    async def sql(self, call_id: str, *statements: str, session_key: str = ""):
        self.open(call_id, tool="database", session_key=session_key)
        self.units(call_id, *statements)
        self.close(call_id, len(statements))
        return await self.wait(call_id)


def table(value: str) -> list[list[str]]:
    """The data rows of a result table (header, rule and row count dropped)."""
    lines = value.splitlines()
    assert lines[1].replace("-", "").replace("+", "") == "", value  # the rule under the header
    return [[cell.strip() for cell in line.split(" | ")] for line in lines[2:-1]]


def sql_threads() -> list[int]:
    """The threads of this process now running a unit's SQL."""
    busy = []
    for ident, frame in sys._current_frames().items():
        while frame is not None:
            if frame.f_code.co_name == "_run_text":
                busy.append(ident)
                break
            frame = frame.f_back
    return busy


async def until_no_sql_threads(timeout: float = 5.0) -> list[int]:
    for _ in range(int(timeout / 0.02)):
        if not sql_threads():
            return []
        await asyncio.sleep(0.02)
    return sql_threads()


def file_fingerprint(path: Path) -> tuple:
    st = path.stat()
    return hashlib.sha256(path.read_bytes()).hexdigest(), st.st_size, st.st_mtime_ns


# ---- the sample database builder ---------------------------------------------------


def test_sample_database_has_the_tables_and_plausible_counts(sample_path):
    assert sample_path.is_file() and sample_path.suffix == ".sqlite"
    assert sample_path.parent == built_files.cache_dir() / "database"
    version = ".".join(map(str, sys.version_info[:3]))
    assert sample_path.name.startswith(f"sample-{version}-")
    assert not stat.S_IMODE(sample_path.stat().st_mode) & 0o222  # nobody may write it
    con = sqlite3.connect(f"{sample_path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        names = {r[0] for r in con.execute("SELECT name FROM sqlite_schema WHERE type='table'")}
        assert {"modules", "definitions", "imports", "tokens", "unicode_chars", "about"} <= names
        counts = {
            t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in sample_db.TABLES
        }
        indexes = {r[0] for r in con.execute("SELECT name FROM sqlite_schema WHERE type='index'")}
        orphans = con.execute(
            "SELECT count(*) FROM tokens t LEFT JOIN modules m ON m.id = t.module_id "
            "WHERE m.id IS NULL"
        ).fetchone()[0]
        nested = con.execute(
            "SELECT count(*) FROM definitions c JOIN definitions p ON p.id = c.parent_id "
            "WHERE c.lineno < p.lineno OR c.end_lineno > p.end_lineno "
            "OR c.module_id != p.module_id"
        ).fetchone()[0]
    finally:
        con.close()
    assert {
        "tokens_text",
        "tokens_module_line",
        "definitions_module",
        "imports_imported",
    } <= indexes
    # Against the data sources, counted here without the builder's code.
    named = sum(1 for cp in range(sys.maxunicode + 1) if unicodedata.name(chr(cp), None))
    assert counts["unicode_chars"] == named
    root = sample_db.stdlib_root()
    skip = {"test", "tests", "idle_test", "site-packages"}
    py_files = [p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts)]
    assert counts["modules"] == len(py_files)
    assert 5_000 < counts["definitions"] < 100_000 and 1_000 < counts["imports"] < 50_000
    assert 1_000_000 < counts["tokens"] < 3_000_000
    assert 1_000_000 < sum(counts.values()) < 3_500_000
    assert orphans == 0 and nested == 0
    about = sample_db.read_about(sample_path)
    assert {t: int(about[f"rows.{t}"]) for t in sample_db.TABLES} == counts
    assert about["python"] == sys.version.split()[0] and about["skipped_files"] == "0"


async def test_from_config_locates_the_sample_and_caps_the_timeout(sample_path):
    tool = await DatabaseTool.from_config(GatewayConfig(unit_timeout=2.0))
    assert await tool.db_path() == str(sample_path)
    assert tool.statement_timeout == 2.0 and tool.max_rows == 200
    assert "unicode_chars(codepoint" in tool.spec.description
    own = await DatabaseTool.from_config(GatewayConfig(database_path=str(sample_path)))
    assert own.statement_timeout == 5.0 and "sqlite_schema" in own.spec.description
    with pytest.raises(FileNotFoundError, match="--database-path"):
        await DatabaseTool.from_config(GatewayConfig(database_path="/nonexistent/x.sqlite"))


# ---- the tool through gRPC --------------------------------------------------------


async def test_list_tools_shows_database_with_sql_statements(stub):
    response = await stub.ListTools(pb.ToolGatewayServiceListToolsRequest(), timeout=5)
    tools = {t.name: t for t in response.tools}
    db = tools["database"]
    assert db.partial_mode == common_pb2.PARTIAL_MODE_SQL_STATEMENTS
    assert db.partial_safe and db.command_field == "sql"
    schema = json.loads(db.parameters_json_schema)
    assert schema["required"] == ["sql"] and schema["properties"]["sql"]["type"] == "string"
    for table_name in ("modules(", "definitions(", "imports(", "tokens(", "unicode_chars("):
        assert table_name in db.description
    assert f"at most {MAX_ROWS} rows" in db.description


async def test_statements_of_one_call_give_correct_results(stub):
    """The `sql` argument as the scheduler splits it (one unit per statement),
    checked against values computed here from the data sources."""
    arguments = json.dumps(
        {
            "sql": (
                "SELECT count(*) AS digits FROM unicode_chars WHERE category = 'Nd';\n"
                "-- a join over the big table\n"
                "SELECT d.qualname, d.arg_count, count(t.id) AS selfs\n"
                "FROM definitions d JOIN modules m ON m.id = d.module_id\n"
                "LEFT JOIN tokens t ON t.definition_id = d.id AND t.text = 'self'\n"
                "WHERE m.name = 'json.decoder' AND d.kind = 'method'\n"
                "GROUP BY d.id ORDER BY d.lineno;"
            )
        }
    )
    parser = arguments_parser_for("SQL_STATEMENTS", "sql")
    units = [u for i in range(0, len(arguments), 7) for u in parser.feed(arguments[i : i + 7])]
    units += parser.finish()
    assert len(units) == 2 and units[1].text.startswith("-- a join")

    stream = SqlStream(stub)
    events = await stream.sql("a", *(u.text for u in units))
    digits, methods = results(events)
    assert digits.ok and methods.ok, (digits.exception, methods.exception)

    expected_digits = sum(
        1 for cp in range(sys.maxunicode + 1) if unicodedata.category(chr(cp)) == "Nd"
    )
    assert table(digits.value) == [[str(expected_digits)]]

    source = Path(json.decoder.__file__).read_text(encoding="utf-8")
    expected = []
    for cls in ast.parse(source).body:
        if isinstance(cls, ast.ClassDef):
            for f in cls.body:
                if isinstance(f, ast.FunctionDef):
                    a = f.args
                    n_args = len(a.posonlyargs + a.args + a.kwonlyargs)
                    n_args += (a.vararg is not None) + (a.kwarg is not None)
                    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
                    selfs = sum(
                        1
                        for t in tokens
                        if t.string == "self" and f.lineno <= t.start[0] <= f.end_lineno
                    )
                    expected.append([f"{cls.name}.{f.name}", str(n_args), str(selfs)])
    assert len(expected) >= 4 and table(methods.value) == expected

    end = last(events).call_result
    assert end.ok and end.units_executed == 2
    assert end.output.startswith("-- statement 1\ndigits\n") and "-- statement 2\n" in end.output
    assert "JSONDecoder.raw_decode" in end.output
    await stream.end()


async def test_a_unit_with_several_statements_runs_them_in_order(stub):
    stream = SqlStream(stub)
    events = await stream.sql("a", "SELECT 'x;y' AS s; SELECT 2 AS n /* ; */;\n-- done")
    (outcome,) = results(events)
    assert outcome.ok
    first, second = outcome.value.split("\n\n")
    assert table(first) == [["x;y"]] and table(second) == [["2"]]
    await stream.end()


async def test_writes_are_refused_and_the_file_is_unchanged(stub, gateway):
    path = Path(await gateway[1].db_path())
    before = file_fingerprint(path)
    writes = [
        "INSERT INTO modules (name, package, path, is_package, lines, blank_lines, bytes) "
        "VALUES ('x', 'x', 'x.py', 0, 1, 0, 1);",
        "UPDATE modules SET lines = 0;",
        "DELETE FROM tokens;",
        "DROP TABLE imports;",
        "ATTACH DATABASE '/tmp/conveyor-attached.sqlite' AS other;",
        "CREATE TABLE scratch (a);",
        "CREATE TEMP TABLE scratch (a);",
        "CREATE INDEX modules_lines ON modules(lines);",
        "PRAGMA user_version = 7;",
        "PRAGMA writable_schema = ON;",
        "WITH x AS (SELECT 1) INSERT INTO about VALUES ('k', 'v');",
    ]
    stream = SqlStream(stub)
    events = await stream.sql("a", *writes, "SELECT count(*) FROM modules;", "PRAGMA user_version;")
    outcomes = results(events)
    for statement, outcome in zip(writes, outcomes, strict=False):
        assert not outcome.ok, statement
        assert "not authorized" in outcome.exception and "read-only" in outcome.exception, (
            statement,
            outcome.exception,
        )
    assert "INSERT is refused" in outcomes[0].exception
    assert "DROP TABLE is refused" in outcomes[3].exception
    assert "ATTACH is refused" in outcomes[4].exception
    assert "CREATE TEMP TABLE is refused" in outcomes[6].exception
    assert "PRAGMA user_version = 7 is not allowed" in outcomes[8].exception
    count, version = outcomes[len(writes) :]
    assert count.ok and version.ok and table(version.value) == [["0"]]
    assert int(table(count.value)[0][0]) == int(sample_db.read_about(path)["rows.modules"])
    assert not Path("/tmp/conveyor-attached.sqlite").exists()
    assert file_fingerprint(path) == before
    end = last(events).call_result
    assert not end.ok and end.units_executed == len(writes) + 2
    await stream.end()


async def test_read_only_pragmas_and_the_schema_can_be_read(stub):
    stream = SqlStream(stub)
    events = await stream.sql(
        "a",
        "PRAGMA table_info(imports);",
        "SELECT m.name, count(*) FROM sqlite_schema m, pragma_table_info(m.name) p "
        "WHERE m.type = 'table' AND m.name = 'tokens' GROUP BY m.name;",
    )
    info, columns = results(events)
    assert info.ok and [r[1] for r in table(info.value)][:4] == [
        "id",
        "module_id",
        "lineno",
        "imported",
    ]
    assert columns.ok and table(columns.value) == [["tokens", "7"]]
    await stream.end()


async def test_a_slow_query_stops_at_the_statement_timeout(stub):
    stream = SqlStream(stub)
    events = await stream.sql("a", SLOW_SQL, "SELECT 42 AS answer;")
    slow, after = results(events)
    assert not slow.ok and slow.exception.startswith("TimeoutError:")
    assert f"{TIMEOUT_S:g} s statement timeout" in slow.exception
    assert 0.9 * TIMEOUT_S < slow.duration_seconds < TIMEOUT_S + 5  # stopped, not run to its end
    assert after.ok and table(after.value) == [["42"]]
    await stream.end()


async def test_the_row_cap_truncates(stub):
    stream = SqlStream(stub)
    events = await stream.sql(
        "a",
        "SELECT codepoint, name FROM unicode_chars ORDER BY codepoint;",
        "SELECT codepoint, name FROM unicode_chars ORDER BY codepoint LIMIT 3;",
    )
    capped, small = results(events)
    assert capped.ok and capped.truncated and "truncated" in capped.value
    rows = table(capped.value)
    assert len(rows) == MAX_ROWS and rows[-1][0] == str(_named_codepoints()[MAX_ROWS - 1])
    assert small.ok and not small.truncated and small.value.endswith("(3 rows)")
    assert table(small.value) == [
        ["32", "SPACE"],
        ["33", "EXCLAMATION MARK"],
        ["34", "QUOTATION MARK"],
    ]
    assert "truncated" in last(events).call_result.output
    await stream.end()


def _named_codepoints() -> list[int]:
    return [cp for cp in range(0x300) if unicodedata.name(chr(cp), None)]


async def test_sql_errors_are_unit_errors_and_the_next_unit_runs(stub):
    stream = SqlStream(stub)
    events = await stream.sql(
        "a", "SELEC 1;", "SELECT * FROM no_such_table;", "SELECT 'after' AS word;"
    )
    syntax, missing, after = results(events)
    assert not syntax.ok and 'near "SELEC": syntax error' in syntax.exception
    assert not missing.ok and "no such table: no_such_table" in missing.exception
    assert after.ok and table(after.value) == [["after"]]
    end = last(events).call_result
    assert not end.ok and end.units_executed == 3
    assert "Error: OperationalError: no such table" in end.output and "after" in end.output
    await stream.end()


async def test_cancel_call_interrupts_the_running_query(patient_stub):
    assert not sql_threads()
    stream = SqlStream(patient_stub)
    stream.open("a", tool="database", session_key="s")
    stream.units("a", SLOW_SQL)
    await stream.wait("a", "unit_started")
    await asyncio.sleep(0.3)
    assert sql_threads(), "the slow query is not running"
    stream.send("a", cancel=pb.CancelCall(reason="user gave up"))
    error = last(await stream.wait("a", timeout=5)).error
    assert error.code == common_pb2.TOOL_ERROR_CODE_CANCELLED and "user gave up" in error.message
    assert not await until_no_sql_threads(2.0), "the query kept running after the cancel"
    # The session (same key) is usable at once: the interrupted query let go of it.
    events = await stream.sql("b", "SELECT 1 AS one;", session_key="s")
    assert table(results(events)[0].value) == [["1"]]
    await stream.end()


async def test_cancelling_the_stream_interrupts_the_running_query(patient_stub):
    stream = SqlStream(patient_stub)
    stream.open("a", tool="database")
    stream.units("a", SLOW_SQL)
    await stream.wait("a", "unit_started")
    await asyncio.sleep(0.3)
    assert sql_threads(), "the slow query is not running"
    stream.call.cancel()
    assert not await until_no_sql_threads(2.0), "the query kept running after the stream ended"
