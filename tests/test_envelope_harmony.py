"""gpt-oss harmony messages: tool calls found in streamed output (function
calls' JSON, the python tool's code), the same for any split of the text."""

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
from scheduler.envelopes.harmony import FORMAT, MAX_HEADER, recipient
from scheduler.parsers import ParseFailure, PythonStatementParser, parser_for
from tests.envelope_helpers import merged, scan_cut
from tests.test_integration import (
    FILLER,
    collect,
    run_request,
    unit_results,
)

CONTEXT = ScanContext(fence_tools={"python": "python"})


def function(tool: str) -> CallOpened:
    return CallOpened(Envelope.HARMONY, tool, CallBody.ARGUMENTS)


PYTHON = CallOpened(Envelope.HARMONY, "python", CallBody.COMMAND)


def scan(text: str, cuts: list[int] = (), context: ScanContext = CONTEXT) -> list:
    return scan_cut(EnvelopeScanner([FORMAT], context), text, cuts)


def scan_by_char(text: str, context: ScanContext = CONTEXT) -> list:
    return scan(text, list(range(len(text))), context)


def calls(events: list) -> list[tuple[CallOpened, str]]:
    """(opened, text) of each call, checking the events' shape."""
    out = []
    current = None
    for e in events:
        if isinstance(e, CallOpened):
            assert current is None, "a call opened inside another"
            current = [e, ""]
        elif isinstance(e, CallText):
            assert current is not None, "text outside a call"
            current[1] += e.text
        else:
            assert current is not None, "a close without a call"
            out.append(tuple(current))
            current = None
    assert current is None, "a call was left open"
    return out


def both(text: str) -> list:
    """The events, checked to be the same whole and one character at a time."""
    whole = scan(text)
    assert scan_by_char(text) == whole
    return whole


# ---- the format (the examples are the harmony guide's) -----------------------


def test_a_function_call_after_the_chain_of_thought():
    text = (
        "<|channel|>analysis<|message|>Need to use function get_weather.<|end|>"
        "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json"
        '<|message|>{"location":"San Francisco"}<|call|>'
    )
    assert both(text) == [
        function("get_weather"),
        CallText('{"location":"San Francisco"}'),
        CallClosed(),
    ]


@pytest.mark.parametrize(
    "header",
    [
        "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json",
        "<|start|>assistant<|channel|>commentary to=functions.get_weather<|constrain|>json",
        "<|start|>assistant<|channel|>commentary to=functions.get_weather json",
        "<|start|>assistant to=functions.get_weather<|channel|>commentary json",
        "<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json",
        "<|channel|>commentary to=functions.get_weather <|constrain|>json",  # first message
        " to=functions.get_weather<|channel|>commentary json",  # first, recipient in the role
    ],
)
def test_the_recipient_may_be_in_the_role_or_the_channel_part(header):
    text = header + '<|message|>{"city": "Paris"}<|call|>'
    assert both(text) == [function("get_weather"), CallText('{"city": "Paris"}'), CallClosed()]


def test_messages_without_a_recipient_are_not_calls():
    text = (
        "<|channel|>analysis<|message|>thinking about to=functions.x and <|message|><|end|>"
        "<|start|>assistant<|channel|>commentary<|message|>**Action plan**: call tools<|end|>"
        "<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>"
        '{"sunny": true}<|end|>'
        "<|start|>assistant<|channel|>final<|message|>2 + 2 = 4.<|return|>"
    )
    assert both(text) == []


def test_the_python_tool_gets_its_code_as_a_command():
    text = (
        "<|channel|>analysis<|message|>Compute.<|end|>"
        "<|start|>assistant<|channel|>analysis to=python code<|message|>x = 1\nprint(x)\n<|call|>"
    )
    assert both(text) == [PYTHON, CallText("x = 1\nprint(x)\n"), CallClosed()]


def test_the_python_tool_is_the_runs_python_tool():
    text = "<|channel|>analysis to=python code<|message|>1<|call|>"
    renamed = ScanContext(fence_tools={"python": "py_exec"})
    assert scan(text, [], renamed)[0] == CallOpened(Envelope.HARMONY, "py_exec", CallBody.COMMAND)
    # Without one the call names "python", which the run reports as unknown.
    assert scan(text, [], ScanContext())[0] == function("python")


def test_other_recipients_name_their_tool():
    header = "<|channel|>analysis to=browser.search <|constrain|>json"
    text = header + '<|message|>{"query": "x"}<|call|>'
    assert calls(both(text)) == [(function("browser.search"), '{"query": "x"}')]


def test_several_calls_in_one_output():
    text = (
        '<|channel|>commentary to=functions.a json<|message|>{"n": 1}<|call|>'
        '<|start|>assistant<|channel|>commentary to=functions.b json<|message|>{"n": 2}<|end|>'
        "<|start|>assistant<|channel|>analysis to=python code<|message|>3<|return|>"
    )
    assert calls(both(text)) == [
        (function("a"), '{"n": 1}'),
        (function("b"), '{"n": 2}'),
        (PYTHON, "3"),
    ]


def test_an_unended_message_ends_at_the_next_one():
    text = (
        '<|channel|>commentary to=functions.a json<|message|>{"n": 1}'
        '<|start|>assistant<|channel|>commentary to=functions.b json<|message|>{"n": 2}'
        '<|channel|>commentary to=functions.c json<|message|>{"n": 3}<|call|>'
    )
    assert calls(both(text)) == [
        (function("a"), '{"n": 1}'),
        (function("b"), '{"n": 2}'),
        (function("c"), '{"n": 3}'),
    ]


def test_a_call_opens_at_its_message_token_and_its_text_streams():
    scanner = EnvelopeScanner([FORMAT], CONTEXT)

    def feed(text):
        return merged(scanner.feed(text))

    assert feed("<|start|>assistant<|channel|>analysis to=py") == []
    assert feed("thon code<|mess") == []
    assert feed("age|>") == [PYTHON]
    assert feed("x = 1\n") == [CallText("x = 1\n")]  # a statement's newline is not held
    assert feed("y = 2<|") == [CallText("y = 2")]  # this may be an end token
    assert feed("ca") == []
    assert feed("ll|>after") == [CallClosed()]
    assert not scanner.in_call


def test_the_python_code_reaches_the_statement_parser_while_it_is_written():
    code = "import math\nx = 6 * 7\nfor i in range(2):\n    print(i)\nmath.sqrt(16)\n"
    text = "<|channel|>analysis to=python code<|message|>" + code + "<|call|>"
    parser = parser_for(PartialMode.PYTHON_STATEMENTS)
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
    assert first_at is not None and first_at < text.index("x = 6")
    direct = PythonStatementParser()
    assert [u.text for u in units] == [u.text for u in direct.feed(code) + direct.finish()]


def test_recipient_parsing():
    assert recipient("assistant<|channel|>commentary to=functions.f <|constrain|>json") == (
        "functions.f"
    )
    assert recipient("assistant to=functions.f<|channel|>commentary") == "functions.f"
    assert recipient("<|channel|>analysis") is None
    assert recipient("assistant<|channel|>analysis into=x") is None


# ---- malformed and truncated --------------------------------------------------


def arguments_error(text: str) -> str:
    from scheduler.parsers import JsonFieldsParser

    parser = JsonFieldsParser("code")
    with pytest.raises(ParseFailure) as err:
        parser.feed(text)
        parser.finish()
    return str(err.value)


def test_output_that_ends_inside_a_call_closes_it_with_what_it_has():
    text = '<|channel|>commentary to=functions.python json<|message|>{"code": "x = 1\\ny = '
    [(opened, args)] = calls(both(text))
    assert opened == function("python")
    assert "ended inside a string" in arguments_error(args)


def test_output_that_ends_inside_a_callers_header_is_a_call_without_text():
    [(opened, args)] = calls(both("<|start|>assistant<|channel|>commentary to=functions.f"))
    assert opened == function("f") and args == ""
    assert both("<|start|>assistant<|channel|>analysis<|mess") == []


def test_a_header_without_a_message_is_no_call():
    text = "<|start|>assistant to=functions.f<|end|> plain <|channel|>x to=functions.g<|start|>"
    assert both(text) == []


def test_an_overlong_header_is_plain_text_again():
    long = "<|start|>assistant" + "x" * (MAX_HEADER + 50)
    text = long + '<|channel|>commentary to=functions.f<|message|>{"a": 1}<|call|>'
    assert calls(both(text)) == [(function("f"), '{"a": 1}')]


# ---- any split, any input ------------------------------------------------------


def texts(size: int):
    return st.text(max_size=size).filter(lambda t: "<|" not in t)  # no special tokens


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | texts(8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts(5), inner, max_size=3),
    max_leaves=8,
)
tool_names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,10}", fullmatch=True)
prose = texts(30).map(lambda t: t + " to=functions.not_a_call ")  # content is skipped
code = texts(40)


@st.composite
def outputs(draw):
    """A completion of several harmony messages and the calls it holds."""
    parts, expected = [], []
    for n in range(draw(st.integers(1, 4))):
        start = "" if n == 0 and draw(st.booleans()) else "<|start|>assistant"
        kind = draw(st.sampled_from(["analysis", "final", "function", "python"]))
        if kind in ("analysis", "final"):
            parts.append(f"{start}<|channel|>{kind}<|message|>{draw(prose)}<|end|>")
            continue
        if kind == "function":
            tool = draw(tool_names)
            body = json.dumps(draw(st.dictionaries(texts(6), json_values, max_size=4)))
            to, channel, ctype = (
                f"functions.{tool}",
                "commentary",
                draw(st.sampled_from([" <|constrain|>json", "<|constrain|>json", " json", ""])),
            )
            expected.append((function(tool), body))
        else:
            body = draw(code)
            to, channel, ctype = "python", "analysis", draw(st.sampled_from([" code", ""]))
            expected.append((PYTHON, body))
        end = draw(st.sampled_from(["<|call|>", "<|end|>", "<|return|>"]))
        if draw(st.booleans()):  # the recipient after the channel
            header = f"{start}<|channel|>{channel} to={to}{ctype}"
        else:  # in the role part
            header = f"{start} to={to}<|channel|>{channel}{ctype}"
        parts.append(f"{header}<|message|>{body}{end}")
    return "".join(parts), expected


@settings(max_examples=300, deadline=None)
@given(outputs(), st.lists(st.integers(0, 3000), max_size=40))
def test_any_split_gives_the_same_calls(output, cuts):
    text, expected = output
    whole = scan(text)
    assert scan(text, [c % (len(text) + 1) for c in cuts]) == whole
    assert calls(whole) == expected


@settings(max_examples=100, deadline=None)
@given(outputs())
def test_one_character_at_a_time_gives_the_same_calls(output):
    text, _ = output
    assert scan_by_char(text) == scan(text)


FRAGMENTS = [
    "<|start|>", "<|channel|>", "<|message|>", "<|constrain|>", "<|end|>", "<|call|>",
    "<|return|>", "<|", "|>", "<|sta", "assistant", " to=functions.", " to=python", "f",
    "analysis", "commentary", " ", "json", "{", "}", '"', "\n", "x",
]  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from(FRAGMENTS), max_size=40).map("".join),
    st.lists(st.integers(0, 400), max_size=20),
)
def test_malformed_text_never_raises_and_gives_the_same_events_for_any_split(text, cuts):
    whole = scan(text)
    assert scan(text, [c % (len(text) + 1) for c in cuts]) == whole
    calls(whole)  # well formed


# ---- end to end -------------------------------------------------------------------

CODE = "import math\nx = 6 * 7\nprint(x)\nmath.sqrt(16)\n"
COMPLETION = (
    "<|channel|>analysis<|message|>I will compute it with python.<|end|>"
    "<|start|>assistant<|channel|>analysis to=python code<|message|>" + CODE + "<|call|>" + FILLER
)


def harmony_request(completions: list[str], mode: int) -> conveyor_pb2.RunRequest:
    return run_request(completions, mode, envelopes=[conveyor_pb2.ENVELOPE_HARMONY])


async def test_end_to_end_partial_and_sequential_give_the_same_results(stub):
    completions = [COMPLETION, "done"]
    partial = await collect(stub, harmony_request(completions, conveyor_pb2.EXECUTION_MODE_PARTIAL))
    sequential = await collect(
        stub, harmony_request(completions, conveyor_pb2.EXECUTION_MODE_SEQUENTIAL)
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
    truncated = (
        "<|start|>assistant<|channel|>commentary to=functions.python <|constrain|>json"
        '<|message|>{"code": "x = 1\\ny = 2\\n'
    )
    events = await collect(
        stub, harmony_request([truncated, "done"], conveyor_pb2.EXECUTION_MODE_PARTIAL)
    )
    errors = [e.parse_error for e in events if e.WhichOneof("event") == "parse_error"]
    assert len(errors) == 1 and errors[0].call_id == "call-0"
    assert "ended inside a string" in errors[0].message
    assert events[-1].WhichOneof("event") == "run_finished"
    assert events[-1].run_finished.finish_reason == common_pb2.FINISH_REASON_FORCED_END


def test_a_long_message_streams_as_it_arrives_nothing_held():
    scanner = EnvelopeScanner([FORMAT], CONTEXT)
    scanner.feed("<|channel|>analysis to=python code<|message|>")
    for _ in range(20_000):  # each character goes out in the delta it came in
        assert scanner.feed("a") == [CallText("a")]


@pytest.mark.parametrize("extra", [-1, 0, 1])
def test_a_header_of_up_to_max_header_characters_is_one(extra):
    header = "assistant<|channel|>commentary to=functions.f "
    header += "x" * (MAX_HEADER - len(header) + extra)
    text = f'<|start|>{header}<|message|>{{"a": 1}}<|call|>'
    expected = [] if extra > 0 else [(function("f"), '{"a": 1}')]
    assert calls(both(text)) == expected
