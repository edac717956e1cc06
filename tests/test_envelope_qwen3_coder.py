"""Qwen3-Coder XML tool calls: found in streamed output, transcoded into the
JSON arguments the run's parsers read, the same for any split of the text."""

from __future__ import annotations

import json

import pytest
from conveyor.v1 import common_pb2, conveyor_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from conveyor_common.types import Envelope, PartialMode
from scheduler.envelopes import (
    CallBody,
    CallClosed,
    CallOpened,
    CallText,
    EnvelopeScanner,
    ScanContext,
)
from scheduler.envelopes.qwen3_coder import FORMAT, scalar_json, value_kind
from scheduler.parsers import (
    JsonFieldsParser,
    ParseFailure,
    PythonStatementParser,
    arguments_parser_for,
)
from tests.envelope_helpers import merged, scan_cut
from tests.test_integration import (
    FILLER,
    collect,
    run_request,
    unit_results,
)

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "days": {"type": "integer"},
        "metric": {"type": "boolean"},
        "lat": {"type": "number"},
        "when": {"type": ["null", "string"]},
        "hours": {"type": "array", "items": {"type": "integer"}},
        "opts": {"type": "object"},
        "note": {"anyOf": [{"type": "null"}, {"type": "integer"}]},
    },
}
PYTHON = {"type": "object", "properties": {"code": {"type": "string"}}}
CONTEXT = ScanContext(
    fence_tools={"python": "python"},
    tool_schemas={"get_weather": WEATHER, "python": PYTHON},
)


def opened(tool: str) -> CallOpened:
    return CallOpened(Envelope.QWEN3_CODER, tool, CallBody.ARGUMENTS)


def scan(text: str, cuts: list[int] = (), context: ScanContext = CONTEXT) -> list:
    return scan_cut(EnvelopeScanner([FORMAT], context), text, cuts)


def scan_by_char(text: str, context: ScanContext = CONTEXT) -> list:
    return scan(text, list(range(len(text))), context)


def calls(events: list) -> list[tuple[str, str]]:
    """(tool, arguments text) of each call, checking the events' shape."""
    out: list[tuple[str, str]] = []
    current = None
    for e in events:
        if isinstance(e, CallOpened):
            assert current is None, "a call opened inside another"
            current = [e.tool, ""]
        elif isinstance(e, CallText):
            assert current is not None, "text outside a call"
            current[1] += e.text
        else:
            assert current is not None, "a close without a call"
            out.append(tuple(current))
            current = None
    assert current is None, "a call was left open"
    return out


def render(name: str, arguments: dict) -> str:
    """A call as Qwen3-Coder's chat template writes it."""
    params = "".join(
        f"<parameter={k}>\n{v if isinstance(v, str) else json.dumps(v)}\n</parameter>\n"
        for k, v in arguments.items()
    )
    return f"<function={name}>\n{params}</function>\n"


# ---- the format -------------------------------------------------------------


def test_a_call_becomes_json_arguments():
    text = (
        "Let me check.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n"
        "</parameter>\n<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>\nDone."
    )
    expected = [opened("get_weather"), CallText('{"city": "Paris", "days": 3}'), CallClosed()]
    assert scan(text) == expected
    assert scan_by_char(text) == expected


def test_values_are_typed_by_the_tool_schema():
    arguments = {
        "city": "3",  # a string stays a string, whatever it looks like
        "days": 3,
        "metric": True,
        "lat": 48.85,
        "when": "tomorrow",  # nullable strings stay strings
        "hours": [9, 12, 18],
        "opts": {"units": "C", "deep": {"x": [1, {"y": None}]}},
        "note": 7,
        "extra": "not in the schema: a string",
    }
    [(tool, args)] = calls(
        scan("<tool_call>\n" + render("get_weather", arguments) + "</tool_call>")
    )
    assert tool == "get_weather"
    assert json.loads(args) == arguments


def test_without_a_schema_every_value_is_a_string():
    text = "<tool_call>\n" + render("other", {"n": 3, "flag": True}) + "</tool_call>"
    assert json.loads(calls(scan(text))[0][1]) == {"n": "3", "flag": "true"}


@pytest.mark.parametrize(
    ("value", "kind", "expected"),
    [
        ("3", "integer", "3"),
        (" 42 ", "integer", "42"),
        ("3.5", "integer", '"3.5"'),  # not an integer: kept as the string it is
        ("-1.5e3", "number", "-1.5e3"),
        ("7", "number", "7"),
        (".5", "number", "0.5"),
        ("nan", "number", '"nan"'),
        ("True", "boolean", "true"),
        ("false", "boolean", "false"),
        ("yes", "boolean", '"yes"'),
        ("None", "integer", "null"),
        ("null", "null", "null"),
        ("٣", "integer", '"٣"'),
    ],
)
def test_scalar_conversion(value, kind, expected):
    assert scalar_json(value, kind) == expected


def test_value_kinds():
    assert value_kind(WEATHER, "city") == ("string", "string")
    assert value_kind(WEATHER, "days") == ("scalar", "integer")
    assert value_kind(WEATHER, "when") == ("string", "string")  # ["null", "string"]
    assert value_kind(WEATHER, "note") == ("scalar", "integer")  # anyOf
    assert value_kind(WEATHER, "hours") == ("raw", "array")
    assert value_kind(WEATHER, "nope") == ("string", "string")
    assert value_kind({}, "x") == ("string", "string")
    assert value_kind({"properties": {"x": {"type": "null"}}}, "x") == ("scalar", "null")


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        ("\nParis\n", "Paris"),  # the template's layout
        ("Paris", "Paris"),  # no layout newlines
        ("\n\nParis\n\n", "\nParis\n"),  # only one newline each side is layout
        ("\n", ""),
        ("", ""),
        ("\na\nb\n", "a\nb"),
        ("  x  ", "  x  "),  # spaces are the value's
        (
            '\n"q" \\ </b> </tool_call> <function=f> <parameter=z>\n',
            '"q" \\ </b> </tool_call> <function=f> <parameter=z>',
        ),  # only </parameter> ends a value
        ("\r\nx\r\n", "\r\nx\r"),
        ("\né 😀 \t \x01\n", "é 😀 \t \x01"),
    ],
)
def test_value_whitespace_and_escapes(raw, value):
    call = f"<function=get_weather><parameter=city>{raw}</parameter></function>"
    text = f"<tool_call>{call}</tool_call>"
    arguments = json.dumps({"city": value}, ensure_ascii=False)
    expected = [opened("get_weather"), CallText(arguments), CallClosed()]
    assert scan(text) == expected
    assert scan_by_char(text) == expected


def test_several_functions_and_several_blocks():
    text = (
        "<tool_call>\n"
        + render("get_weather", {"city": "Paris"})
        + render("get_weather", {"city": "Rome"})
        + "</tool_call>\nand\n<tool_call>\n"
        + render("python", {"code": "x = 1"})
        + "</tool_call>"
    )
    assert [(t, json.loads(a)) for t, a in calls(scan(text))] == [
        ("get_weather", {"city": "Paris"}),
        ("get_weather", {"city": "Rome"}),
        ("python", {"code": "x = 1"}),
    ]


def test_a_function_without_parameters_has_an_empty_object():
    assert calls(scan("<tool_call>\n<function=now>\n</function>\n</tool_call>")) == [("now", "{}")]


def test_the_call_opens_as_soon_as_its_name_is_complete_and_code_streams():
    scanner = EnvelopeScanner([FORMAT], CONTEXT)

    def feed(text):
        return merged(scanner.feed(text))

    assert feed("Sure.\n<tool_") == []
    assert feed("call>\n<function=pyt") == []
    assert feed("hon>") == [opened("python")]
    assert feed("\n<parameter=code>\nx = 1") == [CallText('{"code": "x = 1')]
    # The newline may be the layout one before </parameter>: held one character.
    assert feed("\n") == []
    assert feed("y") == [CallText("\\ny")]
    assert feed(" = 2\n</param") == [CallText(" = 2")]
    assert feed("eter>\n</function>") == [CallText('"}'), CallClosed()]
    assert feed("\n</tool_call> after") == []
    assert not scanner.in_call


def test_python_code_reaches_the_statement_parser_while_it_is_written():
    code = "import math\nx = 6 * 7\nif x:\n    print(x)\nmath.sqrt(16)"
    text = "<tool_call>\n" + render("python", {"code": code}) + "</tool_call>"
    parser = arguments_parser_for(PartialMode.PYTHON_STATEMENTS, "code")
    scanner = EnvelopeScanner([FORMAT], CONTEXT)
    units, first_at = [], None
    for i, ch in enumerate(text):
        for e in scanner.feed(ch):
            if isinstance(e, CallText):
                units += parser.feed(e.text)
            elif isinstance(e, CallClosed):
                units += parser.finish()
        if units and first_at is None:
            first_at = i
    assert first_at is not None and first_at < text.index("x = 6 * 7\n") + 2
    direct = PythonStatementParser()
    expected = direct.feed(code) + direct.finish()
    assert [u.text for u in units] == [u.text for u in expected]


def test_an_array_parameter_streams_its_elements():
    text = "<tool_call><function=get_weather><parameter=hours>\n[9, 12"
    events = EnvelopeScanner([FORMAT], CONTEXT).feed(text)
    parser = JsonFieldsParser()
    units = parser.feed("".join(e.text for e in events if isinstance(e, CallText)))
    assert [u.text for u in units] == ["9"]


# ---- lenient and malformed ----------------------------------------------------


def test_hermes_json_behind_the_marker_is_read_as_the_tag_format_reads_it():
    tag = CallOpened(Envelope.TAG, "", CallBody.CALL_JSON)
    text = '<tool_call>\n{"name": "python", "arguments": {"code": "1"}}\n</tool_call> and '
    assert scan(text) == [
        tag,
        CallText('{"name": "python", "arguments": {"code": "1"}}\n'),
        CallClosed(),
    ]
    text = '<tool_call>[{"name": "a", "arguments": {}}, {"name": "b"}]</tool_call>'
    assert scan(text) == scan_by_char(text)
    assert [e for e in scan(text) if isinstance(e, CallOpened)] == [tag, tag]


def test_a_function_without_its_tool_call_tags_is_a_call():
    text = "Calling <function=python>\n<parameter=code>\n1\n</parameter>\n</function> done"
    assert calls(scan(text)) == [("python", '{"code": "1"}')]


def test_a_json_body_inside_a_function_is_its_arguments():
    text = '<tool_call>\n<function=python>\n{"code": "1"}\n</function>\n</tool_call>'
    assert calls(scan(text)) == [("python", '{"code": "1"}\n')]


def test_a_missing_function_end_is_forgiven_and_junk_between_tags_skipped():
    text = (
        "<tool_call>\njunk <function=python> more junk <parameter=code>\n1\n</parameter>"
        " trailing </tool_call>"
    )
    assert calls(scan(text)) == [("python", '{"code": "1"}')]


def test_a_tool_call_without_a_function_is_nothing():
    assert scan("<tool_call>\nnothing here\n</tool_call> plain") == []


def arguments_error(text: str) -> str:
    parser = JsonFieldsParser("code")
    with pytest.raises(ParseFailure) as err:
        parser.feed(text)
        parser.finish()
    return str(err.value)


@pytest.mark.parametrize(
    "text",
    [
        "<tool_call>\n<function=python>\n<parameter=code>\nx = 1\ny = 2\n",  # in a value
        "<tool_call>\n<function=python>\n<parameter=code>\nx = 1\n</parameter>\n",  # in the body
        "<tool_call>\n<function=python>\n<parameter=co",  # in a parameter's name
        "<tool_call>\n<function=python>",  # before any parameter
    ],
)
def test_output_that_ends_inside_a_call_closes_it_unfinished(text):
    for events in (scan(text), scan_by_char(text)):
        [(tool, args)] = calls(events)
        assert tool == "python"
        assert "ended" in arguments_error(args)


def test_output_that_ends_inside_a_function_name_is_a_call_of_that_name():
    assert calls(scan("<tool_call>\n<function=pyt")) == [("pyt", "")]


def test_a_raw_parameter_that_is_not_json_closes_its_call_unfinished():
    text = (
        "<tool_call>\n"
        + render("get_weather", {"hours": "[1, 2", "city": "x"})
        + render("python", {"code": "1"})
        + "</tool_call>"
    )
    events = scan(text)
    assert events == scan_by_char(text)
    (_, broken), second = calls(events)
    assert broken == '{"hours": [1, 2'  # the rest of that function is skipped
    assert second == ("python", '{"code": "1"}')


def test_overlong_names_are_cut():
    text = "<tool_call><function=" + "n" * 1000 + "</function></tool_call>"
    [(tool, _)] = calls(scan(text))
    assert tool == "n" * 256
    assert scan(text) == scan_by_char(text)


# ---- any split, any input ------------------------------------------------------

NEAR_MARKERS = [
    "<", "</", "</param", "</parameter", ">", "\n", '"', "\\", "é", "😀", "\t", "\x01",
    "</tool_call>", "<tool_call>", "<function=f>", "</function>", "<parameter=y>", "a", " ",
    "{", "}",
]  # fmt: skip
values = st.one_of(
    st.text(max_size=30),
    st.lists(st.sampled_from(NEAR_MARKERS), max_size=12).map("".join),
).filter(lambda v: "</parameter>" not in v)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | values,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(values, inner, max_size=3),
    max_leaves=8,
)
names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_.-]{0,10}", fullmatch=True)
TYPED = {
    "s": ("string", values),
    "i": ("integer", st.integers()),
    "f": ("number", st.floats(allow_nan=False, allow_infinity=False)),
    "b": ("boolean", st.booleans()),
    "a": ("array", st.lists(json_values, max_size=4)),
    "o": ("object", st.dictionaries(values, json_values, max_size=4)),
}


@st.composite
def messages(draw):
    """A message of prose and calls, the calls' expected arguments, and the
    run's schemas."""
    schemas, expected, blocks = {}, [], []
    for _ in range(draw(st.integers(1, 3))):
        functions = []
        for _ in range(draw(st.integers(1, 2))):
            tool = draw(names)
            keys = draw(st.lists(st.sampled_from(sorted(TYPED)), max_size=4, unique=True))
            schema = schemas.setdefault(tool, {"type": "object", "properties": {}})
            arguments = {}
            for key in keys:
                kind, strategy = TYPED[key]
                prop = schema["properties"].setdefault(f"p{key}", {"type": kind})
                if prop["type"] != kind:
                    continue
                arguments[f"p{key}"] = draw(strategy)
            functions.append(render(tool, arguments))
            expected.append((tool, arguments))
        blocks.append("<tool_call>\n" + "".join(functions) + "</tool_call>")
    prose = st.text(max_size=20).filter(lambda t: "<tool_call>" not in t and "<function=" not in t)
    text = draw(prose) + "".join(b + draw(prose) for b in blocks)
    return text, expected, ScanContext(tool_schemas=schemas)


@settings(max_examples=300, deadline=None)
@given(messages(), st.lists(st.integers(0, 2000), max_size=40))
def test_any_split_gives_the_same_calls(message, cuts):
    text, expected, context = message
    whole = scan(text, [], context)
    assert scan(text, [c % (len(text) + 1) for c in cuts], context) == whole
    got = [(tool, json.loads(args)) for tool, args in calls(whole)]
    assert got == expected


@settings(max_examples=100, deadline=None)
@given(messages())
def test_one_character_at_a_time_gives_the_same_calls(message):
    text, _, context = message
    assert scan_by_char(text, context) == scan(text, [], context)


FRAGMENTS = [
    "<tool_call>", "</tool_call>", "<function=", "</function>", "<parameter=", "</parameter>",
    "<tool_", "</param", "<func", ">", "\n", "{", "}", "[", "]", '"', "1", "x", "python", "code",
    "days", "hours", " ", "\\",
]  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from(FRAGMENTS), max_size=40).map("".join),
    st.lists(st.integers(0, 400), max_size=20),
)
def test_malformed_text_never_raises_and_gives_the_same_events_for_any_split(text, cuts):
    whole = scan(text)
    assert scan(text, [c % (len(text) + 1) for c in cuts]) == whole
    for _, args in calls(whole):  # well formed; each call's text parses or fails cleanly
        parser = JsonFieldsParser()
        try:
            parser.feed(args)
            parser.finish()
        except ParseFailure:
            pass


# ---- end to end -------------------------------------------------------------------

CODE = "import math\nx = 6 * 7\nprint(x)\nmath.sqrt(16)"
COMPLETION = (
    "I'll compute it.\n<tool_call>\n" + render("python", {"code": CODE}) + "</tool_call>" + FILLER
)


def qwen_request(completions: list[str], mode: int) -> conveyor_pb2.RunRequest:
    return run_request(completions, mode, envelopes=[conveyor_pb2.ENVELOPE_QWEN3_CODER])


async def test_end_to_end_partial_and_sequential_give_the_same_results(stub):
    completions = [COMPLETION, "done"]
    partial = await collect(stub, qwen_request(completions, conveyor_pb2.EXECUTION_MODE_PARTIAL))
    sequential = await collect(
        stub, qwen_request(completions, conveyor_pb2.EXECUTION_MODE_SEQUENTIAL)
    )
    dispatched = [e.unit_dispatched for e in partial if e.WhichOneof("event") == "unit_dispatched"]
    assert len(dispatched) == 4
    assert dispatched[0].during_decode, "the first statement waited for the end of decoding"
    assert unit_results(partial) == unit_results(sequential)
    results = unit_results(partial)
    assert results[("call-0", 2)][:2] == (True, "42\n")
    assert results[("call-0", 3)][2] == "4.0"
    for events in (partial, sequential):
        finished = events[-1].run_finished
        assert finished.finish_reason == common_pb2.FINISH_REASON_FORCED_END
        assert finished.final_text == "done"


async def test_end_to_end_a_truncated_call_is_a_parse_error(stub):
    truncated = "<tool_call>\n<function=python>\n<parameter=code>\nx = 1\ny = (x +"
    events = await collect(
        stub, qwen_request([truncated, "done"], conveyor_pb2.EXECUTION_MODE_PARTIAL)
    )
    errors = [e.parse_error for e in events if e.WhichOneof("event") == "parse_error"]
    assert len(errors) == 1 and errors[0].call_id == "call-0"
    assert "ended inside a string" in errors[0].message
    assert events[-1].WhichOneof("event") == "run_finished"
    assert events[-1].run_finished.finish_reason == common_pb2.FINISH_REASON_FORCED_END


def test_a_long_value_streams_as_it_arrives_nothing_held():
    scanner = EnvelopeScanner([FORMAT], CONTEXT)
    scanner.feed("<tool_call>\n<function=python>\n<parameter=code>\nx")
    for _ in range(20_000):  # each character goes out in the delta it came in
        assert scanner.feed("a") == [CallText("a")]
