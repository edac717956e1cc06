"""The search tool through the gateway's gRPC API: the real FTS5 index over
the Python documentation, and the HTTP adapter against a real loopback server."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import pytest
from conveyor.v1 import common_pb2, tool_gateway_pb2, tool_gateway_pb2_grpc

from conveyor_common.server import stop_server
from scheduler.parsers.json_fields import JsonFieldsParser
from tests.test_gateway import Stream, last, results
from tool_gateway import corpus
from tool_gateway.config import GatewayConfig
from tool_gateway.registry import ToolRegistry
from tool_gateway.server import create_server
from tool_gateway.tools.base import ToolFailure, Unit
from tool_gateway.tools.search_tool import SearchTool, fts_match, fts_terms

pb = tool_gateway_pb2
ROOT = Path(__file__).resolve().parent.parent


# ---- fixtures ----------------------------------------------------------------


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("conveyor-cache")


@pytest.fixture(scope="module")
def index(cache_root) -> Path:
    """The real index, built once for this module into a private cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CONVEYOR_CACHE_DIR", str(cache_root))
        return corpus.ensure_index()


async def _serve(tool: SearchTool):
    server, port = await create_server(
        GatewayConfig(), "127.0.0.1", 0, registry=ToolRegistry([tool])
    )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    return server, channel, tool_gateway_pb2_grpc.ToolGatewayServiceStub(channel)


@pytest.fixture(scope="module")
async def local_stub(index):
    server, channel, stub = await _serve(SearchTool(index_path=str(index)))
    yield stub
    await channel.close()
    await stop_server(server, 0)


class SearchApi(BaseHTTPRequestHandler):
    """A tiny search service: echoes the query into k results; the query
    "boom" fails with HTTP 500 and "garbage" answers with invalid JSON."""

    requests: list[dict] = []

    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        params = dict(urllib.parse.parse_qsl(url.query))
        type(self).requests.append({"path": url.path, **params})
        q, k = params.get("q", ""), int(params.get("k", "0"))
        if q == "boom":
            self._answer(500, b"index offline", "text/plain")
        elif q == "garbage":
            self._answer(200, b'{"results": [', "application/json")
        else:
            hits = [
                {"title": f"{q} #{i}", "snippet": f"about {q}", "url": f"https://example.test/{i}"}
                for i in range(k)
            ]
            self._answer(200, json.dumps({"results": hits}).encode(), "application/json")

    def _answer(self, status: int, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def search_api():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), SearchApi)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/search?lang=en"
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


@pytest.fixture(scope="module")
async def http_stub(search_api):
    server, channel, stub = await _serve(SearchTool(endpoint=search_api, timeout=5))
    yield stub
    await channel.close()
    await stop_server(server, 0)


# ---- helpers -----------------------------------------------------------------


def parsed_units(arguments: dict) -> list[Unit]:
    """The units the scheduler's JSON_FIELDS parser makes of these arguments,
    fed in small pieces as a model would write them."""
    text = json.dumps(arguments)
    parser = JsonFieldsParser()
    units = []
    for i in range(0, len(text), 5):
        units += parser.feed(text[i : i + 5])
    units += parser.finish()
    return [Unit(u.index, u.text, u.field) for u in units]


async def call(stub, call_id: str, units: list[Unit], full_text: str = ""):
    stream = Stream(stub)
    stream.open(call_id, tool="search")
    for u in units:
        stream.send(call_id, unit=pb.CommandUnit(index=u.index, text=u.text, field=u.field))
    stream.send(call_id, close=pb.CloseCall(full_text=full_text, unit_count=len(units)))
    events = await stream.wait(call_id)
    await stream.end()
    return events


def titles(text: str) -> list[str]:
    """The result titles of one query's formatted results, in rank order."""
    out = []
    for line in text.splitlines():
        head, dot, rest = line.partition(". ")
        if dot and head.isdigit():
            out.append(rest.split(" (")[0])
    return out


def query_block(output: str, query: str) -> str:
    for block in output.split("\n\n"):
        if block.startswith(f"query: {query}\n"):
            return block
    raise AssertionError(f"no results for {query!r} in:\n{output}")


# ---- the corpus ----------------------------------------------------------------


def test_corpus_is_built_once_and_reused(index, cache_root, monkeypatch):
    assert index.parent == cache_root / "search"
    assert index.name.startswith(f"corpus-{'.'.join(map(str, sys.version_info[:3]))}-")
    meta = corpus.read_meta(index)
    assert int(meta["docs"]) > 3000 and int(meta["modules"]) > 150
    before = index.stat()

    def no_rebuild(tmp: Path) -> None:
        raise AssertionError("the index was built again")

    monkeypatch.setenv("CONVEYOR_CACHE_DIR", str(cache_root))
    assert corpus.ensure_index(build=no_rebuild) == index
    after = index.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert sorted(p.name for p in index.parent.iterdir()) == [".build.lock", index.name]
    # The real documents are there, with titles as the model will see them.
    with contextlib.closing(sqlite3.connect(f"{index.as_uri()}?mode=ro", uri=True)) as con:
        found = {t for (t,) in con.execute("SELECT title FROM docs")}
    assert {"json.dumps", "os.path.join", "str.join", "topic: for", "sqlite3"} <= found
    assert not any(t.startswith(("this", "antigravity", "tkinter", "turtle")) for t in found)


def test_cli_prints_the_path_without_rebuilding(index, cache_root):
    mtime = index.stat().st_mtime_ns
    env = {**os.environ, "CONVEYOR_CACHE_DIR": str(cache_root)}
    done = subprocess.run(
        [sys.executable, "-m", "tool_gateway.corpus"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(index)
    assert index.stat().st_mtime_ns == mtime


def test_free_text_becomes_quoted_terms():
    assert fts_terms('How do I "sort" a list BY key?') == ["sort", "list", "key"]
    assert fts_terms("the a of") == ["the", "a", "of"]  # only stopwords: keep them
    assert fts_terms('NEAR(" * ^ :)') == ["near"]
    assert fts_terms("_ -- !!") == []
    assert fts_match(["near", "or"], "AND") == '"near" AND "or"'


# ---- through gRPC: the local index ------------------------------------------------


async def test_list_tools_shows_search(local_stub):
    response = await local_stub.ListTools(pb.ToolGatewayServiceListToolsRequest(), timeout=5)
    (search,) = response.tools
    assert search.name == "search" and "Python documentation" in search.description
    assert search.partial_mode == common_pb2.PARTIAL_MODE_JSON_FIELDS
    assert search.partial_safe and search.command_field == ""
    schema = json.loads(search.parameters_json_schema)
    assert schema["required"] == ["queries"]
    assert schema["properties"]["queries"]["maxItems"] == 8
    assert schema["properties"]["top_k"]["default"] == 3


async def test_each_query_runs_as_its_own_unit_and_finds_relevant_docs(local_stub):
    units = parsed_units({"queries": ["json dumps indent", "current working directory"]})
    assert [u.field for u in units] == ["queries[0]", "queries[1]", "queries"]
    events = await call(local_stub, "a", units)
    first, second, whole = results(events)
    assert first.ok and titles(first.value)[0] == "json.dumps"
    assert second.ok and "os.getcwd" in titles(second.value)
    assert whole.ok and whole.value == ""  # its elements already ran
    end = last(events).call_result
    assert end.ok and end.units_executed == 3
    assert end.output.index("query: json dumps indent") < end.output.index(
        "query: current working directory"
    )
    block = query_block(end.output, "json dumps indent")
    assert len(titles(block)) == 3  # the default top_k
    assert "indent" in block.split("\n")[2]  # the snippet of json.dumps


async def test_top_k_written_after_the_queries_still_applies(local_stub):
    units = parsed_units({"queries": ["sort a list by key"], "top_k": 6})
    assert units[-1].field == "top_k"
    events = await call(local_stub, "a", units)
    query, _, top_k = results(events)
    assert len(titles(query.value)) == 3  # ran before top_k was known
    assert top_k.ok and top_k.value == ""
    output = last(events).call_result.output
    assert len(titles(query_block(output, "sort a list by key"))) == 6  # topped up
    assert {"list.sort", "sorted"} <= set(titles(output))

    fewer = await call(local_stub, "b", parsed_units({"queries": ["json dumps"], "top_k": 1}))
    assert titles(last(fewer).call_result.output) == ["json.dumps"]


async def test_hostile_and_empty_queries_fail_cleanly(local_stub):
    hostile = 'NEAR("json" * ^title: AND OR NOT) " dumps \' {col}:x -- ;'
    units = parsed_units({"queries": [hostile, "", '" * ( ) ^ :', 42], "top_k": 50, "lang": "en"})
    events = await call(local_stub, "a", units)
    found, empty, operators, number, whole, top_k, lang = results(events)
    assert found.ok and "json.dumps" in titles(found.value)
    assert not empty.ok and "has no words to search for" in empty.exception
    assert not operators.ok and "has no words to search for" in operators.exception
    assert not number.ok and "must be a string, got 42" in number.exception
    assert whole.ok and whole.value == ""  # its elements ran (and failed) on their own
    assert not top_k.ok and "'top_k' must be an integer from 1 to 10, got 50" in top_k.exception
    assert not lang.ok and "unknown argument 'lang'" in lang.exception
    end = last(events).call_result  # the call ends normally: failures are outcomes
    assert not end.ok and end.units_executed == 7
    assert "error: the query '' has no words" in end.output
    assert "note: 'top_k' must be an integer" in end.output
    assert len(titles(query_block(end.output, hostile))) == 3


async def test_a_call_sent_whole_runs_from_its_full_text(local_stub):
    arguments = json.dumps({"queries": ["read a file line by line"], "top_k": 2})
    events = await call(local_stub, "a", [], full_text=arguments)
    end = last(events).call_result
    assert end.ok and len(titles(end.output)) == 2


# ---- through gRPC: the HTTP adapter ----------------------------------------------


async def test_http_adapter_queries_the_service(http_stub, search_api):
    SearchApi.requests.clear()
    response = await http_stub.ListTools(pb.ToolGatewayServiceListToolsRequest(), timeout=5)
    assert response.tools[0].partial_mode == common_pb2.PARTIAL_MODE_JSON_FIELDS
    units = parsed_units({"queries": ["partial execution", "boom", "garbage"], "top_k": 4})
    events = await call(http_stub, "a", units)
    found, boom, garbage, whole, top_k = results(events)
    assert found.ok and titles(found.value) == [f"partial execution #{i}" for i in range(3)]
    assert "https://example.test/0" in found.value
    assert not boom.ok and "answered HTTP 500" in boom.exception
    assert "index offline" in boom.exception
    assert not garbage.ok and "invalid JSON" in garbage.exception
    assert whole.ok and top_k.ok
    # Each query once with the default k, then the one that worked again for k=4.
    sent = [(r["path"], r["lang"], r["q"], r["k"]) for r in SearchApi.requests]
    assert sent == [
        ("/search", "en", "partial execution", "3"),
        ("/search", "en", "boom", "3"),
        ("/search", "en", "garbage", "3"),
        ("/search", "en", "partial execution", "4"),
    ]
    output = last(events).call_result.output
    assert len(titles(query_block(output, "partial execution"))) == 4
    assert "error: the search service" in query_block(output, "boom")


async def test_http_adapter_reports_an_unreachable_service():
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    session = await SearchTool(endpoint=f"http://127.0.0.1:{port}/", timeout=2).open_session("")
    try:
        outcome = await session.run_unit(Unit(0, '"anything"', "queries[0]"))
        assert not outcome.ok and "could not be reached" in outcome.exception
    finally:
        await session.close()


# ---- construction and the session's end ----------------------------------------


async def test_from_config_picks_the_backend(index, cache_root, monkeypatch, search_api):
    monkeypatch.setenv("CONVEYOR_CACHE_DIR", str(cache_root))
    local = await SearchTool.from_config(GatewayConfig())
    assert local.index_path == str(index) and not local.endpoint
    remote = await SearchTool.from_config(GatewayConfig(search_url=search_api))
    assert remote.endpoint == search_api and "web" in remote.spec.description
    with pytest.raises(ValueError, match="http"):
        SearchTool(endpoint="ftp://127.0.0.1/search")


async def test_cancel_and_close_end_the_session(index):
    tool = SearchTool(index_path=str(index))
    session = await tool.open_session("")
    assert (await session.run_unit(Unit(0, '"json"', "queries[0]"))).ok
    await session.cancel()
    assert not session.alive
    with pytest.raises(ToolFailure):
        await session.run_unit(Unit(0, '"json"', "queries[0]"))
    await session.close()
    await session.close()  # idempotent
    missing = SearchTool(index_path=str(index.parent / "missing.sqlite"))
    with pytest.raises(ToolFailure, match="cannot be read"):
        await missing.open_session("")
