"""Mistral's [TOOL_CALLS] envelope: the v3 JSON list and the v11+
`name[ARGS]{...}` form, streamed in any split, and end to end."""

from __future__ import annotations

import json

import pytest
from conveyor.v1 import common_pb2, conveyor_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.envelopes import (
    CallBody,
    CallClosed,
    CallOpened,
    CallText,
    EnvelopeScanner,
    ScanContext,
    mistral,
)
from scheduler.envelopes.mistral import FORMAT
from tests.envelope_helpers import merged, scan_cut
from tests.test_integration import (
    FILLER,
    collect,
    kinds,
    run_request,
    unit_results,
)

PARTIAL, SEQUENTIAL = conveyor_pb2.EXECUTION_MODE_PARTIAL, conveyor_pb2.EXECUTION_MODE_SEQUENTIAL


def opened(name: str) -> CallOpened:
    return CallOpened("mistral", name, CallBody.ARGUMENTS)


def call(name: str, arguments: str) -> list:
    return [opened(name), CallText(arguments), CallClosed()]


def scan(text: str, cuts: list[int] = ()) -> list:
    return scan_cut(EnvelopeScanner([FORMAT], ScanContext()), text, cuts)


def well_formed(events: list) -> bool:
    """Each call is CallOpened, CallText..., CallClosed; no text outside calls."""
    open_call = False
    for e in events:
        if isinstance(e, CallOpened) == open_call and not isinstance(e, CallClosed):
            return False  # opened twice, or text outside a call
        if isinstance(e, CallClosed) and not open_call:
            return False
        open_call = isinstance(e, CallOpened) or (open_call and isinstance(e, CallText))
    return not open_call


def scan_chars(text: str) -> list:
    return scan(text, list(range(len(text))))


# ---- the v3 list ---------------------------------------------------------


def test_a_list_of_calls_gives_each_call_its_arguments_text():
    text = (
        'Let me look. [TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, '
        '{"name": "python", "arguments": {"code": "x = {1: [2]}\\nprint(\\"}]\\")"}}]'
        " and more text"
    )
    expected = call("get_weather", '{"city": "Paris"}') + call(
        "python", '{"code": "x = {1: [2]}\\nprint(\\"}]\\")"}'
    )
    assert scan(text) == expected
    assert scan_chars(text) == expected


def test_arguments_before_the_name_are_held_until_it_is_known():
    scanner = EnvelopeScanner([FORMAT], ScanContext())
    assert scanner.feed('[TOOL_CALLS][{"id": "a1b2c3d4e", "arguments": {"x": ') == []
    assert scanner.feed('1}, "name": "f"') == [opened("f"), CallText('{"x": 1}')]
    assert scanner.feed("}, ") == [CallClosed()]
    assert scanner.feed('{"name": "g", "arguments": {"y"') == [opened("g"), CallText('{"y"')]
    assert merged(scanner.feed(": 2}}]") + scanner.finish()) == [CallText(": 2}"), CallClosed()]


def test_arguments_written_as_a_json_string_stream_decoded():
    text = '[TOOL_CALLS][{"name": "f", "arguments": "{\\"q\\": \\"a \\\\\\"b\\\\\\"\\"}"}]'
    assert scan(text) == call("f", '{"q": "a \\"b\\""}')


def test_an_element_without_arguments_calls_with_an_empty_object():
    assert scan('[TOOL_CALLS][{"name": "now"}]') == call("now", "{}")


def test_a_bare_call_object_without_the_list_is_one_call():
    text = '[TOOL_CALLS] {"name": "f", "arguments": {"a": 1}} then text'
    assert scan(text) == call("f", '{"a": 1}')


def test_an_element_with_no_usable_name_names_its_own_tool():
    """The run reads it as a tool-call JSON, which reports what is wrong."""
    for element in ('{"arguments": {"a": 1}}', '{"name": 3}', '{"name": "", "x": 1}', "{oops}"):
        assert scan(f"[TOOL_CALLS][{element}]") == [
            CallOpened("mistral", "", CallBody.CALL_JSON),
            CallText(element),
            CallClosed(),
        ], element


def test_a_malformed_element_after_its_name_closes_its_call_without_arguments():
    # Its parser then reports the missing arguments; no "{}" is made up.
    assert scan('[TOOL_CALLS][{"name": "f", "name": "g"}]') == [opened("f"), CallClosed()]
    assert scan('[TOOL_CALLS][{"name": "f" oops}]') == [opened("f"), CallClosed()]


def test_a_list_that_is_not_calls_is_plain_text():
    assert scan("[TOOL_CALLS][1, 2] and text") == []
    assert scan("[TOOL_CALLS][]") == []


# ---- the v11 form ----------------------------------------------------------


def test_v11_calls_one_per_marker_with_and_without_a_call_id():
    text = (
        '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}'
        '[TOOL_CALLS]python[CALL_ID]a1b2c3d4e[ARGS] {"code": "1 + 1"}'
        "[TOOL_CALLS]now[ARGS]{}\nThe answer follows."
    )
    expected = (
        call("get_weather", '{"city": "Paris"}')
        + call("python", '{"code": "1 + 1"}')
        + call("now", "{}")
    )
    assert scan(text) == expected
    assert scan_chars(text) == expected


def test_the_name_opens_the_call_as_soon_as_it_is_complete_and_text_streams():
    scanner = EnvelopeScanner([FORMAT], ScanContext())
    assert scanner.feed("[TOOL_CALLS]get_wea") == []
    assert scanner.feed("ther[AR") == []  # could be [ARGS]
    assert scanner.feed("GS]") == [opened("get_weather")]
    assert scanner.feed('{"city": "Pa') == [CallText('{"city": "Pa')]
    assert scanner.feed("r") == [CallText("r")]  # nothing held back in a string
    assert scanner.feed('is"}') == [CallText('is"}'), CallClosed()]
    assert scanner.feed("plain") == [] and scanner.finish() == []


def test_args_without_their_marker_still_follow_the_name():
    """An engine that drops the [ARGS] special token from the text."""
    assert scan('[TOOL_CALLS]f{"a": [1]} x') == call("f", '{"a": [1]}')


def test_eos_ends_the_envelope_outside_strings_only():
    assert scan('[TOOL_CALLS]f[ARGS]{"html": "<s>x</s>"}') == call("f", '{"html": "<s>x</s>"}')
    # Cut by the end of sequence: closed with what it has (its parser reports it).
    assert scan('[TOOL_CALLS]f[ARGS]{"a": 1</s>[TOOL_CALLS]g[ARGS]{}') == (
        call("f", '{"a": 1') + call("g", "{}")
    )
    assert scan('[TOOL_CALLS][{"name": "f", "arguments": {}}</s>') == call("f", "{}")


def test_truncated_calls_are_closed_with_what_they_have():
    assert scan('[TOOL_CALLS]python[ARGS]{"code": "x = 1\\ny') == call(
        "python", '{"code": "x = 1\\ny'
    )
    assert scan("[TOOL_CALLS]python") == [opened("python"), CallClosed()]
    assert scan("[TOOL_CALLS]python[CALL_ID]abc") == [opened("python"), CallClosed()]
    assert scan('[TOOL_CALLS][{"name": "py') == [
        CallOpened("mistral", "", CallBody.CALL_JSON),
        CallText('{"name": "py'),
        CallClosed(),
    ]
    assert scan("[TOOL_CALLS]") == []


def test_arguments_that_are_not_an_object_are_given_to_the_parser():
    assert scan("[TOOL_CALLS]f[ARGS]null") == [opened("f"), CallText("n"), CallClosed()]


def test_a_name_cut_by_a_newline_still_fails_as_a_call_and_a_huge_one_is_text():
    assert scan("[TOOL_CALLS]Sure, I can\nhelp") == [opened("Sure, I can"), CallClosed()]
    long = "x" * (mistral.MAX_NAME + 50)
    assert scan(f"[TOOL_CALLS]{long}[ARGS]{{}}") == []  # no name: plain text
    assert scan(f"[TOOL_CALLS]f[CALL_ID]{long}[ARGS]{{}}") == [opened("f"), CallClosed()]


def test_other_text_is_left_alone():
    text = 'No calls here: [TOOL_CALL] [ARGS]{"a": 1} </s> [{"name": "f"}]'
    assert scan(text) == []


# ---- any split, generated calls --------------------------------------------

# Strings with what could confuse a scanner: quotes, backslashes, brackets,
# the markers and </s>, control characters, and any unicode.
TEXT = st.lists(
    st.one_of(
        st.sampled_from(['"', "\\", "{", "}", "[", "]", "<", "/", "\n", "\t", "\x00", "\u2028"]),
        st.sampled_from(["</s>", "[ARGS]", "[TOOL_CALLS]", "[CALL_ID]", "</", "[TOOL_"]),
        st.characters(),
    ),
    max_size=8,
).map("".join)
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=8,
)
ARGUMENTS = st.dictionaries(TEXT, JSON, max_size=4)
NAME = st.from_regex(r"[A-Za-z_][A-Za-z0-9_.-]{0,20}", fullmatch=True)
STYLE = st.fixed_dictionaries(
    {"separators": st.sampled_from([(", ", ": "), (",", ":")]), "ensure_ascii": st.booleans()}
)
PLAIN = st.text(st.characters(blacklist_characters="["), max_size=20)


@st.composite
def v3_lists(draw) -> tuple[str, list]:
    style = draw(STYLE)
    calls = draw(st.lists(st.tuples(NAME, ARGUMENTS), min_size=1, max_size=3))
    elements, expected = [], []
    for name, arguments in calls:
        text = json.dumps(arguments, **style)
        fields = [("name", json.dumps(name)), ("arguments", text)]
        if draw(st.booleans()):  # OpenAI style: the arguments as a JSON string
            fields[1] = ("arguments", json.dumps(text, **style))
        if draw(st.booleans()):
            fields.append(("id", json.dumps(draw(NAME))))
        fields = draw(st.permutations(fields))
        item_sep, key_sep = style["separators"]
        elements.append("{" + item_sep.join(f'"{k}"{key_sep}{v}' for k, v in fields) + "}")
        expected += call(name, text)
    blank = draw(st.sampled_from(["", " ", "\n"]))
    return f"[TOOL_CALLS]{blank}[{', '.join(elements)}]", expected


@st.composite
def v11_calls(draw) -> tuple[str, list]:
    style = draw(STYLE)
    calls = draw(st.lists(st.tuples(NAME, ARGUMENTS), min_size=1, max_size=3))
    parts, expected = [], []
    for name, arguments in calls:
        text = json.dumps(arguments, **style)
        call_id = draw(st.sampled_from(["", "[CALL_ID]a1b2c3d4e"]))
        parts.append(f"[TOOL_CALLS]{name}{call_id}[ARGS]{text}")
        expected += call(name, text)
    return draw(st.sampled_from(["", "\n"])).join(parts), expected


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(v3_lists(), v11_calls()),
    PLAIN,
    PLAIN,
    st.lists(st.integers(0, 10_000), max_size=40),
)
def test_any_split_of_generated_calls_gives_the_same_events(form, before, after, cuts):
    body, expected = form
    text = before + body + after
    cuts = [c % (len(text) + 1) for c in cuts]
    assert scan(text) == expected
    assert scan(text, cuts) == expected
    assert scan_chars(text) == expected


# Garbage made of the format's own pieces: whatever it is, the scanner never
# raises, calls are well formed, and every split agrees.
PIECES = st.lists(
    st.sampled_from(
        [
            "[TOOL_CALLS]",
            "[ARGS]",
            "[CALL_ID]",
            "</s>",
            "[",
            "]",
            "{",
            "}",
            '"',
            "\\",
            ",",
            ":",
            " ",
            "\n",
            "<",
            "f",
            '"name"',
            '"arguments"',
            "1",
            "x",
        ]
    ),
    max_size=40,
).map("".join)


@settings(max_examples=300, deadline=None)
@given(PIECES, st.lists(st.integers(0, 200), max_size=20))
def test_malformed_text_never_raises_and_any_split_agrees(text, cuts):
    events = scan(text)
    assert scan(text, [c % (len(text) + 1) for c in cuts]) == events
    assert scan_chars(text) == events
    assert well_formed(events)


# ---- end to end ------------------------------------------------------------

CODE = "x = 40\ny = x + 2\nprint(y)\ndef twice(v):\n    return 2 * v\ntwice(y)\n"
PADDING = "# padding\n" * 40


def completion(code: str) -> str:
    return f"Let me compute.[TOOL_CALLS]python[ARGS]{json.dumps({'code': code})}"


async def test_end_to_end_partial_and_sequential_give_the_same_results(stub):
    completions = [completion(CODE + PADDING + "y - 2\n") + FILLER, "done"]
    partial = await collect(
        stub, run_request(completions, PARTIAL, envelopes=[conveyor_pb2.ENVELOPE_MISTRAL])
    )
    sequential = await collect(
        stub, run_request(completions, SEQUENTIAL, envelopes=[conveyor_pb2.ENVELOPE_MISTRAL])
    )
    results = unit_results(partial)
    assert results == unit_results(sequential)
    assert results[("call-0", 2)][:2] == (True, "42\n")
    assert results[("call-0", 4)][2] == "84"
    assert results[("call-0", 5)][2] == "40"
    dispatched = [e.unit_dispatched for e in partial if e.WhichOneof("event") == "unit_dispatched"]
    assert dispatched[0].call_id == "call-0" and dispatched[0].during_decode
    for events in (partial, sequential):
        assert kinds(events)[-1] == "run_finished"
        assert events[-1].run_finished.finish_reason == common_pb2.FINISH_REASON_FORCED_END


async def test_end_to_end_v3_list_and_a_truncated_call(stub):
    listed = (
        '[TOOL_CALLS] [{"arguments": {"code": "a = 6\\na * 7\\n"}, "name": "python"}, '
        '{"name": "nope", "arguments": {}}]\n'
    )
    truncated = listed + '[TOOL_CALLS]python[ARGS]{"code": "b = 1\\nc = (b +'
    events = await collect(
        stub, run_request([truncated, "done"], PARTIAL, envelopes=[conveyor_pb2.ENVELOPE_MISTRAL])
    )
    results = unit_results(events)
    assert results[("call-0", 1)][2] == "42"
    # The statement before the cut was sent (the parse error then cancels the call).
    dispatched = [
        (e.unit_dispatched.call_id, e.unit_dispatched.text)
        for e in events
        if e.WhichOneof("event") == "unit_dispatched"
    ]
    assert ("call-2", "b = 1\n") in dispatched
    errors = {
        e.parse_error.call_id: e.parse_error.message
        for e in events
        if e.WhichOneof("event") == "parse_error"
    }
    assert "unknown tool 'nope'" in errors["call-1"]
    assert "ended inside a string" in errors["call-2"]
    assert kinds(events)[-1] == "run_finished"
    assert events[-1].run_finished.finish_reason == common_pb2.FINISH_REASON_FORCED_END


@pytest.mark.parametrize("text", ["[TOOL_CALLS]", "[TOOL_CALLS]["])
def test_a_bare_marker_is_no_call(text):
    assert scan(text) == []
