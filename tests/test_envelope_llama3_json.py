"""Llama 3.x JSON tool calls: `{"name": …, "parameters": …}` at the start of
the output or after `<|python_tag|>`, several separated by ";"."""

from __future__ import annotations

import json

import pytest
from conveyor.v1 import common_pb2, conveyor_pb2
from hypothesis import assume, given, settings
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
    llama3_json,
)
from scheduler.parsers import ParseFailure, ToolCallTagParser, arguments_parser_for
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
FORMAT = llama3_json.FORMAT


def opened(tool: str) -> CallOpened:
    return CallOpened(Envelope.LLAMA3_JSON, tool, CallBody.ARGUMENTS)


HANDED_OVER = CallOpened(Envelope.LLAMA3_JSON, "", CallBody.CALL_JSON)


def scanner(*formats) -> EnvelopeScanner:
    return EnvelopeScanner(formats or (FORMAT,), ScanContext(fence_tools={"python": "python"}))


def scan(text: str, cuts=(), formats=()) -> list:
    return scan_cut(scanner(*formats), text, cuts)


def calls(events: list) -> list[tuple[CallOpened, str]]:
    """(CallOpened, its whole text) for each call, checking the events nest."""
    out, current = [], None
    for e in events:
        if isinstance(e, CallOpened):
            assert current is None, events
            current = (e, [])
        elif isinstance(e, CallText):
            assert current is not None, events
            current[1].append(e.text)
        else:
            assert isinstance(e, CallClosed) and current is not None, events
            out.append((current[0], "".join(current[1])))
            current = None
    assert current is None, events
    return out


def outcome(event: CallOpened, text: str):
    """What the run makes of a call: ("units", [...]) or ("error", message)."""
    units = []
    try:
        if event.body is CallBody.CALL_JSON:
            parser = ToolCallTagParser(
                lambda name: arguments_parser_for(PartialMode.PYTHON_STATEMENTS, "code")
            )
        else:
            parser = arguments_parser_for(PartialMode.PYTHON_STATEMENTS, "code")
        units += parser.feed(text)
        units += parser.finish()
    except ParseFailure as e:
        return ("error", str(e))
    return ("units", [u.text for u in units])


# ---- the format's rules ------------------------------------------------------


def test_a_bare_call_at_the_start_of_the_output():
    text = '  \n{"name": "get_weather", "parameters": {"city": "Paris"}}'
    assert scan(text) == [opened("get_weather"), CallText('{"city": "Paris"}'), CallClosed()]


def test_the_call_opens_when_its_name_closes_and_its_arguments_stream():
    s = scanner()
    assert s.feed('{"name": "pyth') == []
    assert s.feed('on", "parameters": {"co') == [opened("python"), CallText('{"co')]
    assert s.feed('de": "x = 1\\n') == [CallText('de": "x = 1\\n')]
    assert s.feed('"}') == [CallText('"}'), CallClosed()]  # as soon as the arguments close
    assert s.feed("} Then some text.") == []
    assert s.finish() == []


def test_arguments_before_the_name_are_held_and_replayed():
    s = scanner()
    assert s.feed('{"parameters": {"code": "print(1)\\n"}, ') == []
    assert s.feed('"name": "python"}') == [
        opened("python"),
        CallText('{"code": "print(1)\\n"}'),
        CallClosed(),
    ]


def test_python_tag_and_several_calls_separated_by_semicolons():
    text = (
        '<|python_tag|>{"name": "a", "parameters": {"x": [1, {"y": "}]"}]}} ; '
        '{"arguments": {"q": "\\"hi\\""}, "name": "b"};{"name": "c"} and then prose; {"name": "d"}'
    )
    assert scan(text) == [
        opened("a"),
        CallText('{"x": [1, {"y": "}]"}]}'),
        CallClosed(),
        opened("b"),
        CallText('{"q": "\\"hi\\""}'),
        CallClosed(),
        opened("c"),
        CallText("{}"),  # a name and no arguments
        CallClosed(),
    ]


def test_arguments_as_a_json_encoded_string():
    inner = json.dumps({"code": "x = 'é'\n"})
    text = json.dumps({"name": "python", "parameters": inner})
    assert scan(text) == [opened("python"), CallText(inner), CallClosed()]


def test_the_first_of_parameters_and_arguments_wins():
    text = '{"name": "f", "arguments": {"a": 1}, "parameters": {"b": 2}}'
    assert scan(text) == [opened("f"), CallText('{"a": 1}'), CallClosed()]


def test_the_text_after_the_envelope_is_plain_again():
    # The fence after the call is found: the envelope handed the text back.
    text = '{"name": "f", "parameters": {}}\n```python\nx = 1\n```\n'
    assert scan(text, formats=(FORMAT, fence.FORMAT)) == [
        opened("f"),
        CallText("{}"),
        CallClosed(),
        CallOpened(Envelope.FENCE, "python"),
        CallText("x = 1\n"),
        CallClosed(),
    ]
    # A ";" not followed by a call is plain text too (it stays in that text).
    text = '{"name": "f", "parameters": {}};\n```python\ny = 2\n```\n'
    assert scan(text, formats=(FORMAT, fence.FORMAT))[3:] == [
        CallOpened(Envelope.FENCE, "python"),
        CallText("y = 2\n"),
        CallClosed(),
    ]


def test_text_that_is_not_a_call_is_plain():
    assert scan('{"answer": 42, "name": "f"}') == []  # its first key says so
    assert scan("{}") == []
    assert scan("{ x }") == []
    assert scan('Sure: {"name": "f", "parameters": {}}') == []  # not at the output start
    assert scan('<|python_tag|>brave_search.call(query="x")') == []  # a built-in tool
    # The plain text is handed back whole: the fence after it is found.
    text = '{"answer": {"nested": "}"}}\n```python\nz = 3\n```'
    assert scan(text, formats=(FORMAT, fence.FORMAT)) == [
        CallOpened(Envelope.FENCE, "python"),
        CallText("z = 3\n"),
        CallClosed(),
    ]


def test_end_tokens_end_the_envelope():
    text = '{"name": "f", "parameters": {"a": 1}}<|eom_id|>; {"name": "g"}'
    assert scan(text) == [opened("f"), CallText('{"a": 1}'), CallClosed()]
    # Inside a call it closes the call with what it has (its parser reports it).
    text = '{"name": "python", "parameters": {"code": "x = 1\\n<|eot_id|>more'
    events = scan(text)
    assert events == [opened("python"), CallText('{"code": "x = 1\\n'), CallClosed()]
    kind, message = outcome(*calls(events)[0])
    assert kind == "error" and "ended inside a string" in message


def test_a_partial_end_token_is_held_only_while_it_may_be_one():
    s = scanner()
    assert s.feed('{"name": "python", "parameters": {"code": "a <|eo') == [
        opened("python"),
        CallText('{"code": "a '),
    ]
    assert s.feed("k|>") == [CallText("<|eok|>")]


# ---- malformed and cut calls: never an exception, always a clear error -----


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"parameters": {"code": "1"}}', 'has no "name"'),
        ('{"name": 5, "parameters": {}}', '"name" must be a non-empty string'),
        ('{"name": "", "parameters": {}}', '"name" must be a non-empty string'),
        ('{"name" "python", "parameters": {}}', "expected ':'"),
        ('<|python_tag|>{"code": "print(1)"}', 'has no "name"'),
        ('{"name": "pyth', "ended inside a string"),
    ],
)
def test_a_call_that_fails_before_its_name_is_handed_over_whole(text, message):
    events = scan(text)
    assert events[0] == HANDED_OVER and events[-1] == CallClosed()
    assert [e for e in events if isinstance(e, CallText)] == [CallText(text.split("|>")[-1])]
    kind, error = outcome(*calls(events)[0])
    assert kind == "error" and message in error


def test_a_named_call_with_malformed_arguments_closes_and_its_parser_reports():
    text = '{"name": "python", "parameters": {"code": "x = 1\\ny = 2\\n", ]}} then prose'
    events = scan(text)
    ((event, body),) = calls(events)
    assert event == opened("python")
    kind, message = outcome(event, body)
    assert kind == "error" and "malformed JSON" in message


def test_a_malformed_tail_after_a_complete_call_is_skipped():
    text = '{"name": "f", "parameters": {"a": 1}, oops [1}}; {"name": "g"}'
    assert scan(text) == [
        opened("f"),
        CallText('{"a": 1}'),
        CallClosed(),
        opened("g"),
        CallText("{}"),
        CallClosed(),
    ]


def test_a_cut_call_closes_with_what_it_has():
    text = '{"name": "python", "parameters": {"code": "x = 40\\nprint(x + 2)\\ny = '
    events = scan(text)
    assert events == [opened("python"), CallText(text[33:]), CallClosed()]
    kind, message = outcome(*calls(events)[0])
    assert kind == "error" and "ended inside a string" in message


# ---- any split of the text gives the same events ----------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)
arguments = st.dictionaries(st.text(max_size=8), json_values, max_size=4)
names = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=10)


@st.composite
def call_texts(draw) -> tuple[str, list[tuple[str, dict]]]:
    """A generated envelope and the (name, arguments) of its calls."""
    made = draw(st.lists(st.tuples(names, arguments), min_size=1, max_size=3))
    parts = []
    for name, args in made:
        key = draw(st.sampled_from(["parameters", "arguments"]))
        items = [("name", name), (key, args)]
        if draw(st.booleans()):
            items.reverse()
        if draw(st.booleans()):
            items.insert(1, ("type", "function"))
        parts.append(
            json.dumps(
                dict(items),
                ensure_ascii=draw(st.booleans()),
                indent=draw(st.sampled_from([None, 1])),
            )
        )
    # The end tokens end the envelope wherever they are (a test above).
    assume(not any(m in part for part in parts for m in llama3_json.END_MARKERS))
    separator = draw(st.sampled_from([";", "; ", " ;\n"]))
    lead = draw(st.sampled_from(["", " \n", "<|python_tag|>", "<|python_tag|> "]))
    tail = draw(st.sampled_from(["", " and some prose", "<|eom_id|>", ";"]))
    return lead + separator.join(parts) + tail, made


@settings(max_examples=200, deadline=None)
@given(call_texts(), st.data())
def test_any_split_gives_the_same_events(generated, data):
    text, made = generated
    whole = scan(text)
    found = calls(whole)
    assert [(e.tool, json.loads(body)) for e, body in found] == [
        (name, args) for name, args in made
    ]
    assert all(e == opened(e.tool) for e, _ in found)
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=30))
    assert scan(text, cuts) == whole
    assert scan(text, range(len(text))) == whole  # one character at a time


noise = st.text(st.sampled_from(list('{}[]":;, \n\ta1<|>python_tageom_id\\') + ["é"]))


@settings(max_examples=300, deadline=None)
@given(noise, st.lists(st.integers(0, 60), max_size=10))
def test_any_text_scans_without_an_error_and_the_same_for_any_split(text, cuts):
    for lead in ("{", "<|python_tag|>", '{"name": "f", "parameters": '):
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
COMPLETION = json.dumps({"name": "python", "parameters": {"code": CODE}}) + FILLER
CUT = '<|python_tag|>{"name": "python", "parameters": {"code": "x = 40\\nprint(x + 2)\\ny = '


def llama3_run(completions: list[str], mode: int) -> conveyor_pb2.RunRequest:
    return run_request(completions, mode, envelopes=[conveyor_pb2.ENVELOPE_LLAMA3_JSON])


async def test_end_to_end_partial_and_sequential_give_the_same_results(stub):
    completions = [COMPLETION, "done"]
    partial = await collect(stub, llama3_run(completions, conveyor_pb2.EXECUTION_MODE_PARTIAL))
    sequential = await collect(
        stub, llama3_run(completions, conveyor_pb2.EXECUTION_MODE_SEQUENTIAL)
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
    events = await collect(stub, llama3_run([CUT, "done"], mode))
    errors = [e.parse_error for e in events if e.WhichOneof("event") == "parse_error"]
    assert len(errors) == 1 and errors[0].call_id == "call-0"
    assert "ended inside a string" in errors[0].message
    # The statements before the cut were sent (the parse error then cancels the call).
    sent = [e.unit_dispatched.text for e in events if e.WhichOneof("event") == "unit_dispatched"]
    partial = mode == conveyor_pb2.EXECUTION_MODE_PARTIAL
    assert sent == (["x = 40\n", "print(x + 2)\n"] if partial else [])
    assert kinds(events)[-1] == "run_finished"
    assert events[-1].run_finished.finish_reason == common_pb2.FINISH_REASON_FORCED_END


def test_the_python_tag_marks_a_call_after_prose_too():
    from scheduler.envelopes import EnvelopeScanner, ScanContext

    text = 'Let me run it. <|python_tag|>{"name": "python", "parameters": {"code": "x = 1\\n"}}'
    for cuts in (len(text), 1):
        scanner = EnvelopeScanner([FORMAT], ScanContext())
        events = []
        for i in range(0, len(text), cuts):
            events += scanner.feed(text[i : i + cuts])
        events += scanner.finish()
        assert events[0] == CallOpened(Envelope.LLAMA3_JSON, "python", CallBody.ARGUMENTS)
        assert "".join(e.text for e in events if isinstance(e, CallText)) == (
            '{"code": "x = 1\\n"}'
        )


def test_a_bare_call_after_prose_is_plain_text():
    from scheduler.envelopes import EnvelopeScanner, ScanContext

    scanner = EnvelopeScanner([FORMAT], ScanContext())
    assert scanner.feed('Here: {"name": "python", "parameters": {}}') + scanner.finish() == []
