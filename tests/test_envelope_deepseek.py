"""DeepSeek's tool-call tokens: V3/R1 (type, name line, fenced JSON) and
V3.1 (name, separator, bare JSON), streamed in any split, and end to end."""

from __future__ import annotations

import json

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
    deepseek,
)
from scheduler.envelopes.deepseek import (
    CALL_BEGIN,
    CALL_END,
    CALLS_BEGIN,
    CALLS_END,
    EOS,
    FORMAT,
    SEP,
)
from tests.envelope_helpers import merged, scan_cut
from tests.test_integration import (
    FILLER,
    collect,
    kinds,
    run_request,
    unit_results,
)

PARTIAL, SEQUENTIAL = conveyor_pb2.EXECUTION_MODE_PARTIAL, conveyor_pb2.EXECUTION_MODE_SEQUENTIAL


def test_the_markers_are_the_tokenizers_own_characters():
    # U+FF5C FULLWIDTH VERTICAL LINE and U+2581 LOWER ONE EIGHTH BLOCK.
    assert CALLS_BEGIN == "<｜tool▁calls▁begin｜>"
    assert CALL_BEGIN == "<｜tool▁call▁begin｜>" and CALL_END == "<｜tool▁call▁end｜>"
    assert SEP == "<｜tool▁sep｜>" and CALLS_END == "<｜tool▁calls▁end｜>"
    assert EOS == "<｜end▁of▁sentence｜>"
    assert {ord(c) for c in CALLS_BEGIN if ord(c) > 127} == {0xFF5C, 0x2581}


def v3(name: str, arguments: str, before_end: str = "\n") -> str:
    return f"{CALL_BEGIN}function{SEP}{name}\n```json\n{arguments}\n```{before_end}{CALL_END}"


def v31(name: str, arguments: str) -> str:
    return f"{CALL_BEGIN}{name}{SEP}{arguments}{CALL_END}"


def opened(name: str) -> CallOpened:
    return CallOpened("deepseek", name, CallBody.ARGUMENTS)


def call(name: str, arguments: str) -> list:
    return [opened(name), CallText(arguments), CallClosed()]


def scan(text: str, cuts: list[int] = ()) -> list:
    return scan_cut(EnvelopeScanner([FORMAT], ScanContext()), text, cuts)


def scan_chars(text: str) -> list:
    return scan(text, list(range(len(text))))


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


# ---- the regions -----------------------------------------------------------


def test_v3_calls_stream_their_fenced_json_without_the_fence():
    text = (
        "I will check.\n"
        + CALLS_BEGIN
        + v3("get_weather", '{"city": "Paris"}')
        + "\n"
        + v3("python", '{"code": "s = \\"```\\"\\nprint(s)"}', before_end="")
        + CALLS_END
        + EOS
    )
    expected = call("get_weather", '{"city": "Paris"}') + call(
        "python", '{"code": "s = \\"```\\"\\nprint(s)"}'
    )
    assert scan(text) == expected
    assert scan_chars(text) == expected


def test_v31_calls_have_no_type_and_no_fence():
    text = CALLS_BEGIN + v31("get_weather", '{"city": "Paris"}') + v31("now", "{}") + CALLS_END
    expected = call("get_weather", '{"city": "Paris"}') + call("now", "{}")
    assert scan(text) == expected
    assert scan_chars(text) == expected


def test_the_name_opens_the_call_and_the_arguments_stream_at_once():
    scanner = EnvelopeScanner([FORMAT], ScanContext())
    assert scanner.feed(CALLS_BEGIN + CALL_BEGIN + "function" + SEP + "pyth") == []
    assert scanner.feed("on\n") == [opened("python")]
    assert scanner.feed("```json\n") == []
    assert scanner.feed('{"code": "x') == [CallText('{"code": "x')]
    assert scanner.feed(" = 1") == [CallText(" = 1")]
    assert scanner.feed(" <") == [CallText(" ")]  # "<" may begin a marker
    assert merged(scanner.feed(' 2"}')) == [CallText('< 2"}'), CallClosed()]
    assert scanner.feed("\n```" + CALL_END + CALLS_END + " ok") == []
    assert scanner.finish() == []


def test_v31_opens_the_call_at_the_separator():
    scanner = EnvelopeScanner([FORMAT], ScanContext())
    assert scanner.feed(CALLS_BEGIN + CALL_BEGIN + "get_weather") == []
    assert scanner.feed(SEP) == [opened("get_weather")]
    assert scanner.feed('{"city"') == [CallText('{"city"')]


def test_the_envelope_ends_and_plain_text_goes_on():
    text = CALLS_BEGIN + v31("f", '{"a": 1}') + CALLS_END + " then " + CALLS_BEGIN + v31("g", "{}")
    assert scan(text) == call("f", '{"a": 1}') + call("g", "{}")  # the second cut by the end


def test_a_call_begin_without_the_calls_begin_opens_an_envelope():
    assert scan("Sure: " + v31("f", '{"a": 1}') + " done") == call("f", '{"a": 1}')


def test_a_call_without_arguments_calls_with_an_empty_object():
    assert scan(CALLS_BEGIN + v31("now", "") + CALLS_END) == call("now", "{}")
    assert scan(CALLS_BEGIN + v3("now", "", before_end="")) == call("now", "{}")
    empty_fence = f"{CALL_BEGIN}function{SEP}now\n```json\n```{CALL_END}"
    assert scan(CALLS_BEGIN + empty_fence + CALLS_END) == call("now", "{}")


def test_a_marker_inside_a_string_ends_the_call_cut_short():
    text = CALLS_BEGIN + v31("f", '{"a": "b') + v31("g", '{"x": 1}') + CALLS_END
    assert scan(text) == call("f", '{"a": "b') + call("g", '{"x": 1}')


def test_truncated_calls_are_closed_with_what_they_have():
    assert scan(CALLS_BEGIN + CALL_BEGIN + "python" + SEP + '{"code": "x = 1\\ny') == call(
        "python", '{"code": "x = 1\\ny'
    )
    # The end of sentence cuts it too, and gives no made-up "{}".
    assert scan(CALLS_BEGIN + CALL_BEGIN + "f" + SEP + EOS) == [opened("f"), CallClosed()]
    assert scan(CALLS_BEGIN + CALL_BEGIN + "function" + SEP + "pyth") == [
        opened("pyth"),
        CallClosed(),
    ]
    assert scan(CALLS_BEGIN + CALL_BEGIN + "python") == [opened("python"), CallClosed()]
    assert scan(CALLS_BEGIN + CALL_BEGIN + "function") == []
    assert scan(CALLS_BEGIN + CALL_BEGIN + "function" + SEP + "f\n```json\n{") == call("f", "{")


def test_arguments_that_are_not_an_object_are_given_to_the_parser():
    text = CALLS_BEGIN + CALL_BEGIN + "f" + SEP + "null" + CALL_END + CALLS_END
    assert scan(text) == [opened("f"), CallText("n"), CallClosed()]


def test_text_where_a_call_should_be_is_plain_text():
    assert scan(CALLS_BEGIN + "Actually, no tools needed. " + v31("f", "{}")) == call("f", "{}")
    # After a call's arguments only blanks, the closing fence and markers count.
    text = CALLS_BEGIN + v31("f", '{"a": 1} trailing') + " " + v31("g", "{}")
    assert scan(text) == call("f", '{"a": 1}') + call("g", "{}")


def test_a_head_or_name_too_long_is_no_call():
    long = "x" * (deepseek.MAX_NAME + 10)
    assert scan(CALLS_BEGIN + CALL_BEGIN + long + SEP + "{}" + CALL_END + CALLS_END) == []
    assert scan(CALLS_BEGIN + CALL_BEGIN + "function" + SEP + long + "\n{}") == []


def test_other_text_is_left_alone():
    text = "<|tool_calls_begin|> <｜tool▁calls｜> function<｜tool▁sep｜>f\n```json\n{}\n```"
    assert scan(text) == []


# ---- any split, generated calls --------------------------------------------

# Strings with what could confuse a scanner: quotes, backslashes, brackets,
# fences, "<", the markers' first characters (a full marker is never text).
TEXT = st.lists(
    st.one_of(
        st.sampled_from(['"', "\\", "{", "}", "[", "]", "<", "`", "\n", "\t", "\x00", "｜", "▁"]),
        st.sampled_from(["```", "\n```", "<｜", "<｜tool▁call", "<｜tool▁sep", "<|tool", "</s>"]),
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
    {
        "separators": st.sampled_from([(", ", ": "), (",", ":")]),
        "ensure_ascii": st.booleans(),
        "indent": st.sampled_from([None, 2]),
    }
)
PLAIN = st.text(st.characters(blacklist_characters="<"), max_size=20)


@st.composite
def envelopes_of_calls(draw) -> tuple[str, list]:
    style = draw(STYLE)
    calls = draw(st.lists(st.tuples(NAME, ARGUMENTS), min_size=1, max_size=3))
    parts, expected = [], []
    for name, arguments in calls:
        text = json.dumps(arguments, **style)
        if draw(st.booleans()):
            parts.append(v3(name, text, before_end=draw(st.sampled_from(["", "\n"]))))
        else:
            parts.append(v31(name, text))
        expected += call(name, text)
    begin = draw(st.sampled_from([CALLS_BEGIN, CALLS_BEGIN + "\n", ""]))
    end = draw(st.sampled_from([CALLS_END, CALLS_END + EOS, EOS, ""]))
    return begin + draw(st.sampled_from(["", "\n"])).join(parts) + end, expected


@settings(max_examples=200, deadline=None)
@given(envelopes_of_calls(), PLAIN, PLAIN, st.lists(st.integers(0, 10_000), max_size=40))
def test_any_split_of_generated_calls_gives_the_same_events(form, before, after, cuts):
    body, expected = form
    text = before + body + after
    cuts = [c % (len(text) + 1) for c in cuts]
    assert scan(text) == expected
    assert scan(text, cuts) == expected
    assert scan_chars(text) == expected


PIECES = st.lists(
    st.sampled_from(
        [
            CALLS_BEGIN,
            CALLS_END,
            CALL_BEGIN,
            CALL_END,
            SEP,
            EOS,
            "function",
            "f",
            "\n",
            "```",
            "`",
            "json",
            "{",
            "}",
            '"',
            "\\",
            "<",
            "<｜tool",
            " ",
            "1",
            ",",
        ]
    ),
    max_size=40,
).map("".join)


@settings(max_examples=300, deadline=None)
@given(PIECES, st.lists(st.integers(0, 400), max_size=20))
def test_malformed_text_never_raises_and_any_split_agrees(text, cuts):
    events = scan(text)
    assert scan(text, [c % (len(text) + 1) for c in cuts]) == events
    assert scan_chars(text) == events
    assert well_formed(events)


# ---- end to end ------------------------------------------------------------

CODE = "x = 40\ny = x + 2\nprint(y)\ndef twice(v):\n    return 2 * v\ntwice(y)\n"
PADDING = "# padding\n" * 40


async def test_end_to_end_partial_and_sequential_give_the_same_results(stub):
    arguments = json.dumps({"code": CODE + PADDING + "y - 2\n"})
    completion = "Let me compute." + CALLS_BEGIN + v3("python", arguments) + CALLS_END + FILLER
    request = {"envelopes": [conveyor_pb2.ENVELOPE_DEEPSEEK]}
    partial = await collect(stub, run_request([completion, "done"], PARTIAL, **request))
    sequential = await collect(stub, run_request([completion, "done"], SEQUENTIAL, **request))
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


async def test_end_to_end_v31_calls_and_a_truncated_one(stub):
    completion = (
        CALLS_BEGIN
        + v31("python", json.dumps({"code": "a = 6\na * 7\n"}))
        + v31("nope", "{}")
        + CALL_BEGIN
        + "python"
        + SEP
        + '{"code": "b = 1\\nc = (b +'
    )
    request = {"envelopes": [conveyor_pb2.ENVELOPE_DEEPSEEK]}
    events = await collect(stub, run_request([completion, "done"], PARTIAL, **request))
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
