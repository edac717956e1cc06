"""JSON fields, the code field streamed into the Python parser, and the
<tool_call> JSON: exact units whatever the delta split, clear errors."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.parsers import (
    JsonFieldsParser,
    ParseFailure,
    PythonStatementParser,
    ToolCallTagParser,
    arguments_parser_for,
)
from scheduler.parsers.json_stream import Chunk, Element, End, Field, JsonObjectScanner
from tests.test_python_parser import STDLIB


def feed_all(parser, text: str, cuts=()) -> list:
    units, start = [], 0
    for cut in sorted(set(cuts)) + [len(text)]:
        units += parser.feed(text[start:cut])
        start = cut
    units += parser.finish()
    return units


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=24,
)
ARGUMENTS = st.dictionaries(st.text(max_size=10), JSON_VALUES, max_size=6)


def encode(obj, data) -> str:
    return json.dumps(
        obj,
        ensure_ascii=data.draw(st.booleans()),
        indent=data.draw(st.sampled_from([None, 2])),
    )


def scan(text: str, cuts=(), keys=frozenset()):
    scanner = JsonObjectScanner(keys)
    events = feed_all(_Adapter(scanner), text, cuts)
    units = [e for e in events if not isinstance(e, Chunk)]
    streams: dict[str, str] = {}
    for e in events:
        if isinstance(e, Chunk):
            streams[e.key] = streams.get(e.key, "") + e.text
    return units, streams


class _Adapter:
    def __init__(self, scanner):
        self.scanner = scanner

    def feed(self, text):
        return self.scanner.feed(text)

    def finish(self):
        self.scanner.finish()
        return []


@settings(max_examples=300, deadline=None)
@given(ARGUMENTS, st.data())
def test_scanner_fields_elements_and_streams_match_the_whole_text(obj, data):
    text = encode(obj, data)
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=40))
    whole = scan(text, (), frozenset(obj))
    assert scan(text, cuts, frozenset(obj)) == whole
    assert scan(text, range(len(text)), frozenset(obj)) == whole
    units, streams = whole
    fields = {e.key: json.loads(e.raw) for e in units if isinstance(e, Field)}
    assert fields == obj
    assert sum(isinstance(e, End) for e in units) == 1
    for key, value in obj.items():
        # A string streams decoded; anything else streams as raw JSON.
        streamed = streams.get(key, "")
        assert (streamed if isinstance(value, str) else json.loads(streamed)) == value
        if isinstance(value, list):
            elements = [json.loads(e.raw) for e in units if isinstance(e, Element) and e.key == key]
            assert elements == value


def test_fields_complete_at_the_delta_that_ends_them():
    parser = JsonFieldsParser()
    assert parser.feed('{"city": "Par') == []
    assert [(u.field, u.text) for u in parser.feed('is", "days": 3')] == [("city", '"Paris"')]
    assert [(u.field, u.text) for u in parser.feed(', "q": ["a", ')] == [
        ("days", "3"),
        ("q[0]", '"a"'),
    ]
    units = parser.feed('"b"]}')
    assert [(u.field, u.text) for u in units] == [("q[1]", '"b"'), ("q", '["a", "b"]')]
    assert [u.index for u in units] == [3, 4]
    assert parser.finish() == []


def test_escapes_split_across_deltas_decode_exactly():
    code = 'print("tab\\there")\ns = "\\u00e9\\ud83d\\ude80"\n'
    text = json.dumps({"code": code})
    expected = [u.text for u in PythonStatementParser().feed(code)]
    for cuts in ([], range(len(text)), [12, 13, 14, 30, 31, 32, 33]):
        units = feed_all(JsonFieldsParser("code"), text, cuts)
        assert [u.text for u in units] == expected
        assert all(u.field == "code" for u in units)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(STDLIB), st.data())
def test_code_field_streams_the_same_statements_as_the_raw_code(path, data):
    code = path.read_text(encoding="utf-8")[:6000]
    text = json.dumps({"code": code}, ensure_ascii=data.draw(st.booleans()))
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=200))
    expected = [u.text for u in feed_all(PythonStatementParser(), code)]
    assert [u.text for u in feed_all(JsonFieldsParser("code"), text, cuts)] == expected


def test_the_first_statement_is_ready_before_the_json_string_closes():
    parser = JsonFieldsParser("code")
    units = parser.feed('{"code": "import os\\nx = 1\\nprint(')
    assert [u.text for u in units] == ["import os\n", "x = 1\n"]


def python_call(name: str = "python") -> ToolCallTagParser:
    def arguments(tool: str):
        if tool != "python":
            raise ParseFailure(f"unknown tool {tool!r}")
        return arguments_parser_for("PYTHON_STATEMENTS", "code")

    return ToolCallTagParser(arguments)


@pytest.mark.parametrize(
    "text",
    [
        '{"name": "python", "arguments": {"code": "a = 1\\nb = a + 1\\n"}}',
        '{"arguments": {"code": "a = 1\\nb = a + 1\\n"}, "name": "python"}',
        '{"name": "python", "arguments": "{\\"code\\": \\"a = 1\\\\nb = a + 1\\\\n\\"}"}',
    ],
    ids=["name-first", "arguments-first", "arguments-as-string"],
)
def test_tool_call_tags_in_every_order(text):
    for cuts in ([], range(len(text))):
        parser = python_call()
        units = feed_all(parser, text, cuts)
        assert parser.name == "python"
        assert [u.text for u in units] == ["a = 1\n", "b = a + 1\n"]
        assert json.loads(parser.arguments_text) == {"code": "a = 1\nb = a + 1\n"}


@pytest.mark.parametrize(
    "text,message",
    [
        ('{"name": "python", "arguments": {"code": "x = 1\\n"', "ended before the object closed"),
        ('{"name": "python", "arguments": {"code": "x = 1', "ended inside a string"),
        ('{"name": "python" "arguments": {}}', "expected ',' or the end"),
        ('{"name": "nope", "arguments": {}}', "unknown tool 'nope'"),
        ('{"arguments": {"code": "x"}}', 'no "name"'),
        ('{"name": "python", "arguments": {"code": 5}}', "must be a string"),
        ('{"name": "python", "arguments": {"source": "x"}}', "no 'code' argument"),
        ('{"name": 3}', '"name" must be a non-empty string'),
        ("{not json}", "expected a key in double quotes"),
    ],
)
def test_malformed_calls_fail_with_a_clear_message(text, message):
    with pytest.raises(ParseFailure, match=message.replace("(", r"\(")):
        feed_all(python_call(), text)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80), st.lists(st.integers(0, 80), max_size=10))
def test_fuzz_arbitrary_text_only_ever_fails_with_parse_failure(text, cuts):
    cuts = [c for c in cuts if c <= len(text)]
    for make in (JsonFieldsParser, lambda: JsonFieldsParser("code"), python_call):
        try:
            whole = feed_all(make(), text)
        except ParseFailure:
            whole = None
        try:
            split = feed_all(make(), text, cuts)
        except ParseFailure:
            split = None
        assert split == whole
