"""Finding tool calls in streamed model output."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.envelopes import (
    FORMATS,
    CallBody,
    CallClosed,
    CallOpened,
    CallText,
    EnvelopeScanner,
    ScanContext,
    formats_named,
)
from tests.envelope_helpers import scan_cut

OUTPUT = (
    "Sure! Here is code:\n```python\nx = 1\nprint(x)\n```\n"
    "A shell example, not ours:\n```bash\nls\n```\n"
    '<tool_call>{"name": "python", "arguments": {"code": "1+1"}}</tool_call> and '
    "<tool_call>{}</tool_call>\nInline ``` is not a fence.\n```python\ny = 2\n"
)


def scanner_for(*names: str) -> EnvelopeScanner:
    return EnvelopeScanner(
        formats_named(names or ("fence", "tag")), ScanContext(fence_tools={"python": "python"})
    )


TAG = CallOpened("tag", "", CallBody.CALL_JSON)


def scan(text: str, cuts: list[int]) -> list:
    return scan_cut(scanner_for(), text, cuts)


def test_fences_and_tags_are_found():
    assert scan(OUTPUT, []) == [
        CallOpened("fence", "python"),
        CallText("x = 1\nprint(x)\n"),
        CallClosed(),
        TAG,
        CallText('{"name": "python", "arguments": {"code": "1+1"}}'),
        CallClosed(),
        TAG,
        CallText("{}"),
        CallClosed(),
        CallOpened("fence", "python"),
        CallText("y = 2\n"),
        CallClosed(),  # closed by the end of output
    ]


def test_a_statement_newline_is_not_held_back():
    scanner = scanner_for()
    assert scanner.feed("```python\n") == [CallOpened("fence", "python")]
    assert scanner.feed("x = 1\n") == [CallText("x = 1\n")]
    assert scanner.feed("``") == []  # could be the closing fence
    assert scanner.feed("`\n") == [CallClosed()]


def test_disabled_envelopes_are_ignored():
    scanner = scanner_for("fence")
    events = scanner.feed('<tool_call>{"name": "x"}</tool_call>\n') + scanner.finish()
    assert events == []


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, len(OUTPUT)), max_size=60))
def test_any_split_gives_the_same_events(cuts):
    assert scan(OUTPUT, cuts) == scan(OUTPUT, [])


def test_a_tag_call_opens_with_its_first_character():
    scanner = scanner_for()
    assert scanner.feed("text <tool_") == []
    assert scanner.feed("call> ") == []  # a call, or a list of calls?
    assert scanner.feed('{"name"') == [TAG, CallText('{"name"')]


LIST = (
    '<tool_call>\n[{"name": "a", "arguments": {"s": "]}, {\\""}},\n'
    ' {"name": "b", "arguments": {"x": [1, {"y": 2}]}}, 7]\n</tool_call> after'
)


def test_a_list_of_calls_in_one_tag_is_a_call_each():
    assert scan(LIST, []) == [
        TAG,
        CallText('{"name": "a", "arguments": {"s": "]}, {\\""}}'),
        CallClosed(),
        TAG,
        CallText('{"name": "b", "arguments": {"x": [1, {"y": 2}]}}'),
        CallClosed(),
        TAG,
        CallText("7"),  # not a call object: its parser says so
        CallClosed(),
    ]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, len(LIST)), max_size=40))
def test_a_list_of_calls_gives_the_same_events_for_any_split(cuts):
    assert scan(LIST, cuts) == scan(LIST, [])


def test_a_list_cut_short_closes_its_open_call():
    events = scan('<tool_call>[{"name": "a", "argu', [])
    assert events == [TAG, CallText('{"name": "a", "argu'), CallClosed()]


def test_unknown_format_names_are_refused_naming_the_known():
    with pytest.raises(ValueError, match="known"):
        formats_named(["tag", "no-such-format"])
    assert {"fence", "tag"} <= set(FORMATS)
