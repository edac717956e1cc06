"""Pythonic tool calls (Llama 3.2/3.3/4): `[f(x=1), g(s="…")]` at the start
of the output, keyword arguments transcoded into JSON as they stream."""

from __future__ import annotations

import json
import math

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
    fence,
    pythonic,
)
from scheduler.parsers import JsonFieldsParser, ParseFailure, arguments_parser_for
from tests.envelope_helpers import scan_cut
from tests.test_integration import (
    FILLER,
    call_outputs,
    collect,
    kinds,
    run_request,
    unit_results,
)

# The format under test (the registry in scheduler/envelopes lists it too).
FORMAT = pythonic.FORMAT


def opened(tool: str) -> CallOpened:
    return CallOpened(Envelope.PYTHONIC, tool, CallBody.ARGUMENTS)


def scan(text: str, cuts=(), formats=()) -> list:
    return scan_cut(
        EnvelopeScanner(formats or (FORMAT,), ScanContext(fence_tools={"python": "python"})),
        text,
        cuts,
    )


def calls(events: list) -> list[tuple[str, str]]:
    """(tool, its JSON text) for each call, checking the events nest."""
    out, current = [], None
    for e in events:
        if isinstance(e, CallOpened):
            assert current is None and e.envelope == Envelope.PYTHONIC, events
            assert e.body is CallBody.ARGUMENTS
            current = (e.tool, [])
        elif isinstance(e, CallText):
            assert current is not None, events
            current[1].append(e.text)
        else:
            assert isinstance(e, CallClosed) and current is not None, events
            out.append((current[0], "".join(current[1])))
            current = None
    assert current is None, events
    return out


def error_of(arguments: str) -> str:
    """The ParseError the run reports for these arguments."""
    parser = JsonFieldsParser()
    with pytest.raises(ParseFailure) as failure:
        parser.feed(arguments)
        parser.finish()
    return str(failure.value)


# ---- the format's rules ------------------------------------------------------


def test_calls_and_their_arguments_as_json():
    text = '[get_weather(city="San Francisco", metric="celsius"), get_weather(city=\'Seattle\')]'
    assert scan(text) == [
        opened("get_weather"),
        CallText('{"city": "San Francisco", "metric": "celsius"}'),
        CallClosed(),
        opened("get_weather"),
        CallText('{"city": "Seattle"}'),
        CallClosed(),
    ]


def test_python_literals():
    text = (
        "[f(i=-12, h=0x1F, b=0b101, o=0o17, u=1_000, x=1.5e-3, y=.5, z=5., "
        "t=True, f=False, n=None, l=[1, [2, []]], tu=(1, 'a'), one=(1,), g=(2), e=(), "
        "d={'k': {\"v\": [None]}, r'raw': 0}, trailing=[1, 2,],)]"
    )
    ((tool, body),) = calls(scan(text))
    assert tool == "f"
    assert json.loads(body) == {
        "i": -12,
        "h": 31,
        "b": 5,
        "o": 15,
        "u": 1000,
        "x": 0.0015,
        "y": 0.5,
        "z": 5.0,
        "t": True,
        "f": False,
        "n": None,
        "l": [1, [2, []]],
        "tu": [1, "a"],
        "one": [1],
        "g": 2,
        "e": [],
        "d": {"k": {"v": [None]}, "raw": 0},
        "trailing": [1, 2],
    }


def test_strings_escapes_prefixes_and_concatenation():
    text = (
        "[f(a='it\\'s', b=\"tab\\tnl\\nq\\\"\", c='\\x41\\u00e9\\U0001F600\\101\\N{BULLET}', "
        "d=r'\\d+\\'', e='''multi\nline \"\"quotes\"\" '' ''', f=\"\"\"x\"\"\", "
        "g='a' \"b\"\n  r'\\c', h='\\q keeps its backslash', i='line\\\ncontinued', "
        "j='raw newline\ntaken', k='', l=u'ü')]"
    )
    ((_, body),) = calls(scan(text))
    assert json.loads(body) == {
        "a": "it's",
        "b": 'tab\tnl\nq"',
        "c": "Aé😀A•",
        "d": "\\d+\\'",
        "e": 'multi\nline ""quotes"" \'\' ',
        "f": "x",
        "g": "ab\\c",
        "h": "\\q keeps its backslash",
        "i": "linecontinued",
        "j": "raw newline\ntaken",
        "k": "",
        "l": "ü",
    }


def test_the_call_opens_at_its_name_and_each_argument_streams():
    s = EnvelopeScanner([FORMAT])
    assert s.feed("[pyth") == []
    assert s.feed("on(") == [opened("python")]
    assert s.feed('code="x = 1\\ny') == [CallText('{"code": "x = 1\\ny')]
    assert s.feed(' = 2\\n"') == [CallText(" = 2\\n")]  # the quote may be followed by another
    assert s.feed(", n=4") == [CallText('", "n": ')]
    assert s.feed("2)") == [CallText("42}"), CallClosed()]
    assert s.feed("] done") == []


def test_a_parenthesised_value_is_held_until_it_is_known():
    s = EnvelopeScanner([FORMAT])
    assert s.feed("[f(x=(1") == [opened("f"), CallText('{"x": ')]
    assert s.feed(", 2") == [CallText("[1, ")]  # a tuple: it streams from now on
    assert s.feed("), y=('a'") == [CallText('2], "y": ')]  # (a number is sent once complete)
    assert s.feed(" 'b'))]") == [CallText('"ab"}'), CallClosed()]  # a grouping: held till ")"


def test_llama4_python_start_and_end():
    text = "<|python_start|>[python(code='print(1)')]<|python_end|>\n```python\nx = 2\n```"
    assert scan(text, formats=(FORMAT, fence.FORMAT)) == [
        opened("python"),
        CallText('{"code": "print(1)"}'),
        CallClosed(),
        CallOpened(Envelope.FENCE, "python"),
        CallText("x = 2\n"),
        CallClosed(),
    ]


def test_text_that_is_not_a_call_list_is_plain():
    for text in ("[1, 2, 3]", "[a link](http://x)", "[]", "[f]", "[f.(x=1)]", " [ 'x' ]"):
        assert scan(text) == [], text
    assert scan("Here: [f(x=1)]") == []  # not at the start of the output
    # Handed back whole: the fence after it is found.
    text = "[see this](x)\n```python\ny = 1\n```"
    assert scan(text, formats=(FORMAT, fence.FORMAT)) == [
        CallOpened(Envelope.FENCE, "python"),
        CallText("y = 1\n"),
        CallClosed(),
    ]


def test_the_envelope_ends_after_the_list_or_at_an_element_that_is_no_call():
    text = "[f(), g(a=1)]\n```python\nz = 3\n```"
    assert scan(text, formats=(FORMAT, fence.FORMAT)) == [
        opened("f"),
        CallText("{}"),
        CallClosed(),
        opened("g"),
        CallText('{"a": 1}'),
        CallClosed(),
        CallOpened(Envelope.FENCE, "python"),
        CallText("z = 3\n"),
        CallClosed(),
    ]
    assert scan("[f(), 42, g()]") == [opened("f"), CallText("{}"), CallClosed()]


# ---- what is not a keyword argument of literals fails the call ---------------


@pytest.mark.parametrize(
    "arguments, kind",
    [
        ('"Paris"', pythonic.POSITIONAL),
        ("city", pythonic.POSITIONAL),
        ("x=1, 2", pythonic.POSITIONAL),
        ("*args", pythonic.EXPRESSION),
        ("**kw", pythonic.EXPRESSION),
        ("x=y", pythonic.EXPRESSION),
        ("x=len(y)", pythonic.EXPRESSION),
        ("x=1 + 2", pythonic.EXPRESSION),
        ("x==1", pythonic.EXPRESSION),
        ("x=[i for i in y]", pythonic.EXPRESSION),
        ("x={1, 2}", pythonic.KEY),
        ("x={'a', 'b'}", pythonic.EXPRESSION),
        ("x={1: 2}", pythonic.KEY),
        ("x=b'bytes'", pythonic.EXPRESSION),
        ("x=f'{y}'", pythonic.EXPRESSION),
        ("x=1j", pythonic.NUMBER),
        ("x=1e999", pythonic.NUMBER),
        ("x=(1 2)", pythonic.EXPRESSION),
        ("x=" + "[" * 70 + "]" * 70, pythonic.NESTING),
    ],
)
def test_a_call_that_is_not_keyword_literals_is_a_clear_parse_error(arguments, kind):
    text = f"[bad({arguments}), good(x=1)]"
    found = calls(scan(text))
    assert found[1] == ("good", '{"x": 1}')  # the list goes on after the failed call
    tool, body = found[0]
    assert tool == "bad"
    assert f"invalid literal {kind!r}" in error_of(body)


def test_a_bad_escape_is_the_same_bad_escape_in_json():
    for escape in ("\\xZ1", "\\N{NO SUCH NAME}", "\\U00110000"):
        found = calls(scan(f"[bad(x='ok {escape} ) ', y=1), good()]"))
        assert found[1] == ("good", "{}")
        assert "invalid escape" in error_of(found[0][1])
    ((_, body),) = calls(scan("[bad(x='\\u12G4')]"))
    assert "invalid \\u escape near 'G'" in error_of(body)


def test_arguments_before_the_failure_are_complete_units():
    ((_, body),) = calls(scan('[python(code="x = 1\\n", 5)]'))
    parser = arguments_parser_for(PartialMode.PYTHON_STATEMENTS, "code")
    assert [u.text for u in parser.feed(body)] == ["x = 1\n"]
    with pytest.raises(ParseFailure, match="pythonic-positional-argument"):
        parser.finish()


def test_a_cut_call_closes_with_what_it_has():
    ((_, body),) = calls(scan('[python(code="x = 1\\ny = '))
    assert body == '{"code": "x = 1\\ny = '
    assert "ended inside a string" in error_of(body)
    ((_, body),) = calls(scan("[f(x=(1, [2"))
    assert body == '{"x": [1, ['


# ---- any split of the text gives the same events ----------------------------

strings = st.text(st.characters(codec="utf-8"), max_size=12)
floats = st.floats(allow_nan=False, allow_infinity=False)
values = st.recursive(
    st.none() | st.booleans() | st.integers() | floats | strings,
    lambda children: (
        st.lists(children, max_size=3)
        | st.lists(children, max_size=3).map(tuple)
        | st.dictionaries(strings, children, max_size=3)
    ),
    max_leaves=10,
)


@st.composite
def python_source(draw, value) -> str:
    """Python source for a value, written one of the ways a model might."""
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, int):
        style = draw(st.sampled_from(["dec", "hex", "under"]))
        if style == "hex" and value >= 0:
            return hex(value)
        if style == "under" and value >= 10000:
            return f"{value:_}"
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return draw(string_source(value))
    if isinstance(value, tuple):
        items = [draw(python_source(v)) for v in value]
        return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
    if isinstance(value, list):
        items = [draw(python_source(v)) for v in value]
        return "[" + ", ".join(items) + (", ]" if items and draw(st.booleans()) else "]")
    pairs = [
        f"{draw(string_source(k, key=True))}: {draw(python_source(v))}" for k, v in value.items()
    ]
    return "{" + ",\n ".join(pairs) + "}"


@st.composite
def string_source(draw, value: str, key: bool = False) -> str:
    styles = ["repr", "double", "triple", "concat"] + ([] if key else ["paren"])
    style = draw(st.sampled_from(styles))
    if style == "double":  # JSON's escapes are Python's too (no surrogates here)
        return json.dumps(value, ensure_ascii=draw(st.booleans()))
    if style == "triple":
        body = value.replace("\\", "\\\\").replace("'", "\\'").replace("\r", "\\r")
        return "'''" + body + "'''"
    if style in ("concat", "paren") and value:
        cut = draw(st.integers(0, len(value)))
        joined = repr(value[:cut]) + draw(st.sampled_from([" ", "\n  "])) + repr(value[cut:])
        return f"({joined})" if style == "paren" else joined
    return repr(value)


def as_json(value):
    if isinstance(value, tuple | list):
        return [as_json(v) for v in value]
    if isinstance(value, dict):
        return {k: as_json(v) for k, v in value.items()}
    return value


identifiers = st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True)


@st.composite
def call_lists(draw):
    made = draw(
        st.lists(
            st.tuples(identifiers, st.dictionaries(identifiers, values, max_size=3)),
            min_size=1,
            max_size=3,
        )
    )
    sources = []
    for name, kwargs in made:
        arguments = ", ".join(f"{k}={draw(python_source(v))}" for k, v in kwargs.items())
        sources.append(f"{name}({arguments})")
    text = "[" + ", ".join(sources) + "]"
    if draw(st.booleans()):
        text = "<|python_start|>" + text + "<|python_end|>"
    return draw(st.sampled_from(["", "  \n"])) + text + draw(st.sampled_from(["", " text"])), made


def same(a, b) -> bool:
    """JSON values equal, floats compared as floats (-0.0 and 0.0 alike)."""
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, int | float) and isinstance(b, int | float) and math.isclose(a, b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b and type(a) is type(b)


@settings(max_examples=200, deadline=None)
@given(call_lists(), st.data())
def test_any_split_gives_the_same_events(generated, data):
    text, made = generated
    whole = scan(text)
    found = calls(whole)
    assert [tool for tool, _ in found] == [name for name, _ in made]
    for (_, body), (_, kwargs) in zip(found, made, strict=True):
        assert same(json.loads(body), as_json(kwargs)), (body, kwargs)
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=30))
    assert scan(text, cuts) == whole
    assert scan(text, range(len(text))) == whole  # one character at a time


noise = st.text(st.sampled_from(list("[](){}'\",=:.\\ \n#*-+0ex_fruTNn") + ["é"]))


@settings(max_examples=300, deadline=None)
@given(noise, st.lists(st.integers(0, 60), max_size=10))
def test_any_text_scans_without_an_error_and_the_same_for_any_split(text, cuts):
    for lead in ("[f(", "[f(x=", "<|python_start|>[g(a=1), f(", "["):
        whole = scan(lead + text)
        calls(whole)  # well nested
        assert scan(lead + text, cuts) == whole


# ---- end to end: three services, forced decoding ----------------------------

CODE = (
    "import json\n"
    "data = [i * i for i in range(10)]\n"
    "total = sum(data)\n"
    "print(total)\n"
    "json.dumps({'n': len(data), 'max': max(data)})\n"
)
COMPLETION = f"[python(code={CODE!r})]" + FILLER
CUT = '[python(code="x = 40\\nprint(x + 2)\\ny = '


def pythonic_run(completions: list[str], mode: int) -> conveyor_pb2.RunRequest:
    return run_request(completions, mode, envelopes=[conveyor_pb2.ENVELOPE_PYTHONIC])


async def test_end_to_end_partial_and_sequential_give_the_same_results(stub):
    completions = [COMPLETION, "done"]
    partial = await collect(stub, pythonic_run(completions, conveyor_pb2.EXECUTION_MODE_PARTIAL))
    sequential = await collect(
        stub, pythonic_run(completions, conveyor_pb2.EXECUTION_MODE_SEQUENTIAL)
    )
    results = unit_results(partial)
    assert results == unit_results(sequential)
    assert len(results) == 5
    assert results[("call-0", 3)] == (True, "285\n", "", "")
    assert results[("call-0", 4)][2] == '\'{"n": 10, "max": 81}\''
    dispatched = [e.unit_dispatched for e in partial if e.WhichOneof("event") == "unit_dispatched"]
    assert dispatched[0].during_decode, "the first statement waited for the end of decoding"
    order = kinds(partial)
    last_token = len(order) - 1 - order[::-1].index("token_delta")
    assert order.index("unit_result") < last_token
    for events in (partial, sequential):
        assert events[-1].run_finished.finish_reason == common_pb2.FINISH_REASON_FORCED_END
        assert "parse_error" not in kinds(events)
        assert call_outputs(events)["call-0"][0]


@pytest.mark.parametrize(
    "mode", [conveyor_pb2.EXECUTION_MODE_PARTIAL, conveyor_pb2.EXECUTION_MODE_SEQUENTIAL]
)
async def test_end_to_end_a_cut_call_is_a_parse_error_and_the_run_finishes(stub, mode):
    events = await collect(stub, pythonic_run([CUT, "done"], mode))
    errors = [e.parse_error for e in events if e.WhichOneof("event") == "parse_error"]
    assert len(errors) == 1 and errors[0].call_id == "call-0"
    assert "ended inside a string" in errors[0].message
    # The statements before the cut were sent (the parse error then cancels the call).
    sent = [e.unit_dispatched.text for e in events if e.WhichOneof("event") == "unit_dispatched"]
    partial = mode == conveyor_pb2.EXECUTION_MODE_PARTIAL
    assert sent == (["x = 40\n", "print(x + 2)\n"] if partial else [])
    assert kinds(events)[-1] == "run_finished"
    assert events[-1].run_finished.finish_reason == common_pb2.FINISH_REASON_FORCED_END


async def test_end_to_end_a_positional_argument_is_a_parse_error(stub):
    completion = "[python('print(1)'), python(code='print(2)')]"
    events = await collect(
        stub, pythonic_run([completion, "done"], conveyor_pb2.EXECUTION_MODE_PARTIAL)
    )
    errors = {
        e.parse_error.call_id: e.parse_error.message
        for e in events
        if e.WhichOneof("event") == "parse_error"
    }
    assert "pythonic-positional-argument" in errors["call-0"]
    assert unit_results(events)[("call-1", 0)][:2] == (True, "2\n")
    assert events[-1].run_finished.finish_reason == common_pb2.FINISH_REASON_FORCED_END
