"""The `search` tool: several queries per call, each run the moment the model
has finished writing it.

Arguments: `{"queries": ["...", ...], "top_k": 3}`, split as JSON fields: each
element `queries[i]` is a unit (its text is the element's raw JSON, a quoted
string) and runs at once, while the model is still writing the next query.

Two backends:
- the local index (default): SQLite FTS5 over the Python documentation
  (`tool_gateway/corpus.py`), one read-only connection per session, queried
  in a worker thread so the event loop never waits on SQLite;
- a search API over HTTP (`endpoint`): `GET endpoint?q=<query>&k=<top_k>`
  answering `{"results": [{"title": ..., "snippet": ..., "url": ...}]}`.

Free text becomes a safe FTS5 query: the words (runs of letters and digits)
are quoted, so quotes, `*`, `^`, `:`, parentheses and AND/OR/NOT/NEAR in the
user's text are plain words or separators, never syntax. Common English
stopwords are dropped when other words remain. Results come in three tiers,
each filling what the one before left of top_k: documents whose title holds
every word (a name lookup: "json dumps" finds json.dumps first), then those
holding every word anywhere (AND), then those holding any word (OR). bm25
ranks within a tier, with a title match worth 4 body matches.

`top_k` may arrive after the queries (models write it last). Queries run with
the value known so far (the default, 3, until set). When `top_k` arrives and is
larger than a query ran with, that unit re-runs those queries for the missing
results; when smaller, the extra results are dropped. So the text the model
reads back always has top_k results per query, whatever the field order, and
is the same in sequential and partial mode.

A session may serve several calls one after another (a shared session key),
so a call's state (its queries and top_k) is reset by its unit 0 and after
`finish`. Units run one at a time per session; two calls running at once in
one shared session would mix their queries (the search tool needs no shared
session, so callers should not give it a key).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import re
import sqlite3
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from tool_gateway import corpus
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

MAX_QUERIES = 8
MAX_TOP_K = 10
MAX_TERMS = 16  # words of one query sent to FTS5
TITLE_WEIGHT = 4.0  # bm25 weight of the title column (the body's is 1)
SNIPPET_TOKENS = 24
TITLE_CHARS = 200
SNIPPET_CHARS = 320
HTTP_BODY_CAP = 1 << 20
HTTP_TIMEOUT_S = 10.0
CLOSE_WAIT_S = 5.0

STOPWORDS = frozenset(
    "a an and are as at be by can do does for from how i in is it its me my of on or "
    "that the this to was what when where which who why will with you your".split()
)
_WORD = re.compile(r"[^\W_]+")  # letters and digits: never an FTS5 operator or quote
_ELEMENT = re.compile(r"queries\[(\d+)\]")

T = TypeVar("T")


def _parameters(default_top_k: int) -> dict:
    return {
        "type": "object",
        "properties": {
            "queries": {
                "type": "array",
                "items": {"type": "string"},
                "minItems": 1,
                "maxItems": MAX_QUERIES,
                "description": "Search queries in plain words; each one is searched separately.",
            },
            "top_k": {
                "type": "integer",
                "minimum": 1,
                "maximum": MAX_TOP_K,
                "default": default_top_k,
                "description": "Results to return per query.",
            },
        },
        "required": ["queries"],
    }


LOCAL_DESCRIPTION = (
    "Searches the Python documentation: the language reference topics (statements, "
    "operators, data model) and the docstrings of the standard library's modules, functions, "
    "classes and methods. Give several queries at once; each returns the best matching "
    "entries (a name like json.dumps, or 'topic: for') with a snippet of their text."
)
HTTP_DESCRIPTION = (
    "Searches the web. Give several queries at once; each returns the best matching pages "
    "with their title, address and a snippet."
)


class SearchError(Exception):
    """A query that could not run: its unit fails (ok=False), the call goes on."""


@dataclass(frozen=True)
class Hit:
    title: str
    snippet: str
    url: str = ""
    kind: str = ""  # local index: module, function, class, method, attribute, topic


@dataclass
class _Query:
    text: str
    k: int = 0  # the top_k it ran with
    hits: list[Hit] = field(default_factory=list)
    error: str = ""


# ---- free text to FTS5 ---------------------------------------------------------


def fts_terms(text: str) -> list[str]:
    """The words of a query that are searched for (empty: nothing to search)."""
    words = list(dict.fromkeys(w.lower() for w in _WORD.findall(text)))
    kept = [w for w in words if w not in STOPWORDS] or words
    return kept[:MAX_TERMS]


def fts_match(terms: Sequence[str], operator: str) -> str:
    """An FTS5 MATCH expression: each term a quoted string (safe: terms hold
    no quotes), joined with AND or OR."""
    return f" {operator} ".join(f'"{t}"' for t in terms)


def _shown(value: object) -> str:
    """A wrong argument value, as JSON, short enough for a message."""
    return _one_line(json.dumps(value), 80)


def _one_line(text: str, cap: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= cap else text[: cap - 1] + "…"


# ---- the backends (blocking; run in a worker thread) ---------------------------

_SQL = f"""
SELECT rowid, title, kind, snippet(docs, 1, '', '', '…', {SNIPPET_TOKENS})
FROM docs WHERE docs MATCH ? ORDER BY bm25(docs, {TITLE_WEIGHT}, 1.0) LIMIT ?
"""


def local_search(con: sqlite3.Connection, query: str, k: int) -> list[Hit]:
    terms = fts_terms(query)
    if not terms:
        raise SearchError(f"the query {query!r} has no words to search for")
    every = fts_match(terms, "AND")
    tiers = [f"{{title}} : ({every})", every]
    if len(terms) > 1:
        tiers.append(fts_match(terms, "OR"))
    rows: list[tuple] = []
    for expression in tiers:
        seen = {row[0] for row in rows}
        more = con.execute(_SQL, (expression, k + len(rows))).fetchall()
        rows += [row for row in more if row[0] not in seen][: k - len(rows)]
        if len(rows) == k:
            break
    return [
        Hit(_one_line(title, TITLE_CHARS), _one_line(snippet, SNIPPET_CHARS), kind=kind)
        for _, title, kind, snippet in rows
    ]


def _is_loopback(host: str | None) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


def http_search(endpoint: str, query: str, k: int, timeout: float) -> list[Hit]:
    if not query.strip():
        raise SearchError(f"the query {query!r} is empty")
    parts = urllib.parse.urlsplit(endpoint)
    params = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    params += [("q", query), ("k", str(k))]
    url = urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(params)))
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    # Proxies from the environment apply, except to a service on this machine.
    proxies = urllib.request.ProxyHandler({} if _is_loopback(parts.hostname) else None)
    opener = urllib.request.build_opener(proxies)
    try:
        with opener.open(request, timeout=timeout) as response:
            raw = response.read(HTTP_BODY_CAP + 1)
    except urllib.error.HTTPError as e:
        detail = _one_line(e.read(2048).decode(errors="replace"), 300)
        raise SearchError(
            f"the search service {endpoint} answered HTTP {e.code} {e.reason}"
            + (f": {detail}" if detail else "")
        ) from None
    except TimeoutError:
        raise SearchError(
            f"the search service {endpoint} did not answer within {timeout:g} s"
        ) from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise SearchError(f"the search service {endpoint} could not be reached: {reason}") from None
    if len(raw) > HTTP_BODY_CAP:
        raise SearchError(f"the search service {endpoint} sent more than {HTTP_BODY_CAP} bytes")
    try:
        answer = json.loads(raw)
    except ValueError as e:
        raise SearchError(f"the search service {endpoint} sent invalid JSON: {e}") from None
    results = answer.get("results") if isinstance(answer, dict) else None
    if not isinstance(results, list) or not all(isinstance(r, dict) for r in results):
        raise SearchError(
            f'the search service {endpoint} sent JSON without a "results" list of objects'
        )
    return [
        Hit(
            _one_line(str(r.get("title") or ""), TITLE_CHARS),
            _one_line(str(r.get("snippet") or ""), SNIPPET_CHARS),
            url=str(r.get("url") or ""),
        )
        for r in results[:k]
    ]


# ---- output ----------------------------------------------------------------


def format_query(query: _Query, top_k: int) -> str:
    head = f"query: {query.text}"
    if query.error:
        return f"{head}\nerror: {query.error}"
    hits = query.hits[:top_k]
    if not hits:
        return f"{head}\n(no results)"
    lines = [head]
    for n, hit in enumerate(hits, 1):
        title = f"{hit.title} ({hit.kind})" if hit.kind else hit.title
        lines.append(f"{n}. {title}")
        if hit.url:
            lines.append(f"   {hit.url}")
        if hit.snippet:
            lines.append(f"   {hit.snippet}")
    return "\n".join(lines)


# ---- the tool ----------------------------------------------------------------


class SearchTool(Tool):
    def __init__(
        self,
        index_path: str | None = None,
        endpoint: str = "",
        default_top_k: int = 3,
        *,
        timeout: float = HTTP_TIMEOUT_S,
    ):
        if not 1 <= default_top_k <= MAX_TOP_K:
            raise ValueError(f"default_top_k must be 1 to {MAX_TOP_K} (got {default_top_k})")
        if endpoint and urllib.parse.urlsplit(endpoint).scheme not in ("http", "https"):
            raise ValueError(f"the search endpoint {endpoint!r} must be an http(s) URL")
        if timeout <= 0:
            raise ValueError(f"timeout must be positive (got {timeout})")
        self.index_path = index_path  # None: located (built if need be) on first use
        self.endpoint = endpoint
        self.default_top_k = default_top_k
        self.timeout = timeout
        self.spec = ToolSpec(
            name="search",
            description=HTTP_DESCRIPTION if endpoint else LOCAL_DESCRIPTION,
            parameters=_parameters(default_top_k),
            partial_mode=PartialMode.JSON_FIELDS,
            partial_safe=True,  # searching has no side effects
            command_field="",
        )
        self._locating = asyncio.Lock()

    @classmethod
    async def from_config(cls, config) -> SearchTool:
        """The HTTP adapter when `config.search_url` is set; otherwise the
        local index, built first (in a thread, a second or so) if missing.
        Raises corpus.CorpusError when the index cannot be built."""
        endpoint = getattr(config, "search_url", "") or ""
        timeout = float(getattr(config, "unit_timeout", HTTP_TIMEOUT_S))
        if endpoint:
            return cls(endpoint=endpoint, timeout=timeout)
        path = await asyncio.to_thread(corpus.ensure_index)
        return cls(index_path=str(path), timeout=timeout)

    async def open_session(self, session_key: str) -> SearchSession:
        if self.endpoint:
            return SearchSession(self, None)
        path = await self._index()
        try:
            con = await asyncio.to_thread(_connect, path)
        except sqlite3.Error as e:
            raise ToolFailure(
                ToolErrorCode.INTERNAL, f"the search index {path} cannot be read: {e}"
            ) from None
        return SearchSession(self, con)

    async def _index(self) -> str:
        async with self._locating:
            if self.index_path is None:
                try:
                    self.index_path = str(await asyncio.to_thread(corpus.ensure_index))
                except (corpus.CorpusError, OSError) as e:
                    raise ToolFailure(ToolErrorCode.INTERNAL, str(e)) from None
            return self.index_path


def _connect(path: str) -> sqlite3.Connection:
    uri = f"{Path(path).resolve().as_uri()}?mode=ro"
    # Used from worker threads, one at a time (the session's lock).
    con = sqlite3.connect(uri, uri=True, check_same_thread=False)
    try:
        con.execute("SELECT count(*) FROM meta").fetchone()  # a real index, not an empty file
    except sqlite3.Error:
        con.close()
        raise
    return con


class SearchSession(ToolSession):
    def __init__(self, tool: SearchTool, con: sqlite3.Connection | None):
        self._tool = tool
        self._con = con
        self._lock = asyncio.Lock()  # one unit at a time
        self._threads: set[asyncio.Future] = set()  # worker-thread work not yet done
        self._dead = ""  # why no unit can run any more
        self._closed = False
        self._top_k = tool.default_top_k
        self._queries: dict[int, _Query] = {}  # this call's, by position in `queries`
        self._notes: dict[str, None] = {}  # this call's problems not tied to one query
        SESSIONS.labels(tool.spec.name).inc()

    @property
    def alive(self) -> bool:
        return not self._dead

    # ---- units ---------------------------------------------------------

    async def run_unit(self, unit: Unit) -> UnitOutcome:
        async with self._lock:
            if self._dead:
                raise ToolFailure(ToolErrorCode.INTERNAL, self._dead)
            if unit.index == 0:  # a new call
                self._reset()
            started = time.perf_counter()
            try:
                value = await self._unit(unit)
                ok, error = True, ""
            except SearchError as e:
                ok, value, error = False, "", str(e)
            return UnitOutcome(
                unit.index,
                ok=ok,
                value=value,
                exception=error,
                duration_seconds=time.perf_counter() - started,
            )

    async def _unit(self, unit: Unit) -> str:
        """The unit's value; raises SearchError when it fails."""
        element = _ELEMENT.fullmatch(unit.field)
        if element is None and unit.field not in ("queries", "top_k"):
            raise self._problem(
                f"unknown argument {unit.field!r}: search takes 'queries' (a list of "
                "strings) and 'top_k' (an integer)"
            )
        try:
            value = json.loads(unit.text)
        except ValueError as e:
            raise self._problem(f"the value of {unit.field!r} is not valid JSON: {e}") from None
        if element is not None:
            return await self._element(int(element.group(1)), value)
        if unit.field == "top_k":
            await self._set_top_k(value)
            return ""
        return await self._whole_list(value)

    async def _element(self, position: int, value: object) -> str:
        if position >= MAX_QUERIES:
            raise self._problem(
                f"at most {MAX_QUERIES} queries per call: queries[{position}] and later "
                "ones were not run"
            )
        if not isinstance(value, str):
            message = f"queries[{position}] must be a string, got {_shown(value)}"
            self._queries[position] = _Query(_shown(value), error=message)
            raise SearchError(message)
        query = _Query(value)
        self._queries[position] = query
        await self._run(query, self._top_k)
        if query.error:
            raise SearchError(query.error)
        return format_query(query, self._top_k)

    async def _whole_list(self, value: object) -> str:
        """The `queries` field itself (after its elements): runs what did not
        come as element units (a client that sends whole fields), checks the count."""
        if isinstance(value, str):
            value = [value]  # a lone query where a list was meant
        if not isinstance(value, list) or not value:
            raise self._problem(
                f"'queries' must be a list of 1 to {MAX_QUERIES} strings, got {_shown(value)}"
            )
        parts, errors = [], []
        for position, item in enumerate(value[:MAX_QUERIES]):
            if position in self._queries:
                continue
            try:
                parts.append(await self._element(position, item))
            except SearchError as e:
                errors.append(str(e))
        if len(value) > MAX_QUERIES:
            errors.append(
                str(self._problem(f"{len(value)} queries given; only the first {MAX_QUERIES} ran"))
            )
        if errors:
            raise SearchError("; ".join(errors))
        return "\n\n".join(parts)

    async def _set_top_k(self, value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_TOP_K:
            raise self._problem(
                f"'top_k' must be an integer from 1 to {MAX_TOP_K}, got {_shown(value)}; "
                f"using {self._top_k}"
            )
        self._top_k = value
        # Queries that ran with a smaller top_k and may have more results: run
        # them again for the rest. A larger one is cut at output time.
        errors = []
        for query in self._queries.values():
            if not query.error and query.k < value and len(query.hits) == query.k:
                old = query.hits
                await self._run(query, value)
                if query.error:
                    errors.append(query.error)
                    query.hits, query.error = old, ""  # keep what it had
        if errors:
            raise self._problem(f"top_k is {value}, but re-running a query failed: {errors[0]}")

    def _problem(self, message: str) -> SearchError:
        """A problem the model must read back in the call's output too."""
        self._notes[message] = None
        return SearchError(message)

    async def _run(self, query: _Query, k: int) -> None:
        """Runs one query in a worker thread; the result or error lands on `query`."""
        tool = self._tool
        try:
            if self._con is not None:
                hits = await self._in_thread(local_search, self._con, query.text, k)
            else:
                hits = await self._in_thread(
                    http_search, tool.endpoint, query.text, k, tool.timeout
                )
        except SearchError as e:
            query.error = str(e)
            return
        except sqlite3.Error as e:
            # Terms are quoted, so this is not a syntax error from the query text.
            query.error = f"the search index failed: {e}"
            return
        query.k, query.hits, query.error = k, hits, ""

    async def _in_thread(self, fn: Callable[..., T], *args) -> T:
        task = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        self._threads.add(task)
        task.add_done_callback(self._thread_done)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            # Stops a running SQLite statement at once; an HTTP request ends by
            # its timeout and its answer is dropped.
            self._interrupt()
            raise

    def _thread_done(self, task: asyncio.Future) -> None:
        self._threads.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a dropped answer's error is no news
        if self._dead and not self._threads:
            self._close_connection()

    # ---- the call's end ------------------------------------------------

    async def finish(self, full_text: str, outcomes: Sequence[UnitOutcome]) -> str:
        async with self._lock:
            try:
                if not self._queries and full_text.strip():
                    await self._whole_call(full_text)
                parts = [format_query(self._queries[i], self._top_k) for i in sorted(self._queries)]
                parts += [f"note: {note}" for note in self._notes]
                return "\n\n".join(parts) or "(no queries were given)"
            finally:
                self._reset()

    async def _whole_call(self, full_text: str) -> None:
        """A call sent as one piece (no units): runs its arguments object."""
        try:
            arguments = json.loads(full_text)
        except ValueError:
            arguments = None
        if not isinstance(arguments, dict):
            raise ToolFailure(
                ToolErrorCode.BAD_REQUEST, "the call's text is not a JSON arguments object"
            )
        with contextlib.suppress(SearchError):  # a bad top_k leaves the default
            if "top_k" in arguments:
                await self._set_top_k(arguments["top_k"])
        with contextlib.suppress(SearchError):  # failed queries carry their error
            await self._whole_list(arguments.get("queries"))

    def _reset(self) -> None:
        self._top_k = self._tool.default_top_k
        self._queries = {}
        self._notes = {}

    # ---- ending --------------------------------------------------------

    def _interrupt(self) -> None:
        if self._con is not None:
            self._con.interrupt()  # thread-safe: ends the statement in flight

    def _close_connection(self) -> None:
        con, self._con = self._con, None
        if con is not None:
            con.close()

    async def cancel(self) -> None:
        self._dead = self._dead or "the search session was cancelled"
        self._interrupt()
        if not self._threads:  # else the last thread to finish closes it
            self._close_connection()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._dead = self._dead or "the search session was closed"
        self._interrupt()
        if self._threads:
            await asyncio.wait(list(self._threads), timeout=CLOSE_WAIT_S)
        if not self._threads:
            self._close_connection()
        self._queries = {}
        SESSIONS.labels(self._tool.spec.name).dec()
