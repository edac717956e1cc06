"""Finding tool calls in streamed model output."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.envelopes import CallClosed, CallOpened, CallText, EnvelopeScanner

OUTPUT = (
    "Sure! Here is code:\n```python\nx = 1\nprint(x)\n```\n"
    "A shell example, not ours:\n```bash\nls\n```\n"
    '<tool_call>{"name": "python", "arguments": {"code": "1+1"}}</tool_call> and '
    "<tool_call>{}</tool_call>\nInline ``` is not a fence.\n```python\ny = 2\n"
)


def scan(text: str, cuts: list[int]) -> list:
    scanner = EnvelopeScanner({"python": "python"})
    events, start = [], 0
    for cut in sorted(set(cuts)) + [len(text)]:
        events += scanner.feed(text[start:cut])
        start = cut
    events += scanner.finish()
    merged: list = []
    for e in events:  # text may arrive in any number of pieces
        if isinstance(e, CallText) and merged and isinstance(merged[-1], CallText):
            merged[-1] = CallText(merged[-1].text + e.text)
        else:
            merged.append(e)
    return merged


def test_fences_and_tags_are_found():
    assert scan(OUTPUT, []) == [
        CallOpened("fence", "python"),
        CallText("x = 1\nprint(x)\n"),
        CallClosed(),
        CallOpened("tag", ""),
        CallText('{"name": "python", "arguments": {"code": "1+1"}}'),
        CallClosed(),
        CallOpened("tag", ""),
        CallText("{}"),
        CallClosed(),
        CallOpened("fence", "python"),
        CallText("y = 2\n"),
        CallClosed(),  # closed by the end of output
    ]


def test_a_statement_newline_is_not_held_back():
    scanner = EnvelopeScanner({"python": "python"})
    assert scanner.feed("```python\n") == [CallOpened("fence", "python")]
    assert scanner.feed("x = 1\n") == [CallText("x = 1\n")]
    assert scanner.feed("``") == []  # could be the closing fence
    assert scanner.feed("`\n") == [CallClosed()]


def test_disabled_envelopes_are_ignored():
    scanner = EnvelopeScanner({"python": "python"}, tags=False)
    events = scanner.feed('<tool_call>{"name": "x"}</tool_call>\n') + scanner.finish()
    assert events == []


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, len(OUTPUT)), max_size=60))
def test_any_split_gives_the_same_events(cuts):
    assert scan(OUTPUT, cuts) == scan(OUTPUT, [])
