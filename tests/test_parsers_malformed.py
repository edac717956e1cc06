"""Malformed text: every parser fails with ParseFailure and nothing else, the
units before the error come out whatever the split, and the JSON and Python
edge cases an outside probe found (raw control characters, keys given twice,
deep nesting, form feeds, CRLF and CR line ends) are handled as RFC 8259 and
Python's tokenizer say."""

from __future__ import annotations

import ast
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
    parser_for,
)
from scheduler.parsers.json_stream import MAX_DEPTH

MODES = ["PYTHON_STATEMENTS", "JSON_FIELDS", "LINES", "PLAN_STEPS", "SQL_STATEMENTS", "WHOLE"]
# name -> (partial mode, command field), as a tool registry would say
TOOLS = {
    "python": ("PYTHON_STATEMENTS", "code"),
    "search": ("JSON_FIELDS", ""),
    "shell": ("LINES", "command"),
    "sql": ("SQL_STATEMENTS", "query"),
    "calc": ("WHOLE", ""),
}


def tag_parser() -> ToolCallTagParser:
    def arguments(name: str):
        if name not in TOOLS:
            raise ParseFailure(f"unknown tool {name!r}")
        return arguments_parser_for(*TOOLS[name])

    return ToolCallTagParser(arguments)


def every_parser():
    """A maker for every parser the scheduler builds."""
    makers = {f"text:{mode}": (lambda mode=mode: parser_for(mode)) for mode in MODES}
    for mode in MODES:
        makers[f"args:{mode}"] = lambda mode=mode: arguments_parser_for(mode)
        makers[f"args:{mode}:cmd"] = lambda mode=mode: arguments_parser_for(mode, "cmd")
    makers["tag"] = tag_parser
    return makers


# The parsers this file owns the split guarantee for (see UnitParser).
SPLIT_SAFE = {
    "json_fields": JsonFieldsParser,
    "json_code": lambda: JsonFieldsParser("code"),
    "python": PythonStatementParser,
    "tag": tag_parser,
}


def collect(parser, text: str, cuts=()) -> tuple[list[tuple], str | None]:
    """The units handed out until the first ParseFailure, and its message."""
    units: list[tuple] = []
    start = 0
    try:
        for cut in sorted(set(cuts)) + [len(text)]:
            units += [(u.index, u.text, u.field) for u in parser.feed(text[start:cut])]
            start = cut
        units += [(u.index, u.text, u.field) for u in parser.finish()]
    except ParseFailure as e:
        return units, str(e)
    return units, None


def feed_all(parser, text: str, cuts=()) -> list:
    units, message = collect(parser, text, cuts)
    if message is not None:
        raise ParseFailure(message)
    return units


def fails(parser, text: str, match: str, cuts=()) -> list[tuple]:
    """The units before the failure, after checking the failure's message."""
    units, message = collect(parser, text, cuts)
    assert message is not None, f"no ParseFailure for {text!r}"
    assert match in message, message
    return units


def python_call(code: str) -> str:
    return json.dumps({"name": "python", "arguments": {"code": code}})


# ---- 1. raw control characters ------------------------------------------------


CONTROLS = [chr(c) for c in range(0x20)]


@pytest.mark.parametrize("ch", CONTROLS, ids=lambda c: f"U+{ord(c):04X}")
def test_a_raw_control_character_in_any_string_is_a_parse_failure(ch):
    tag = f"U+{ord(ch):04X}"
    # In the tool's name: json.loads(raw) used to escape as JSONDecodeError.
    fails(tag_parser(), '{"name": "py' + ch + 'thon", "arguments": {}}', tag)
    # In a key, a value, a nested value, an array element.
    fails(JsonFieldsParser(), '{"q' + ch + '": 1}', tag)
    fails(JsonFieldsParser(), '{"q": "a' + ch + 'b"}', tag)
    fails(JsonFieldsParser(), '{"q": {"deep": ["a' + ch + '"]}}', tag)
    fails(tag_parser(), '{"name": "search", "arguments": {"q": "a' + ch + '"}}', tag)
    # In a streamed command field.
    fails(JsonFieldsParser("code"), '{"code": "x = 1' + ch + '"}', tag)
    # Escaped, it is fine.
    escaped = json.dumps({"q": "a" + ch + "b"})
    assert json.loads(feed_all(JsonFieldsParser(), escaped)[0][1]) == "a" + ch + "b"


def test_the_control_character_message_gives_its_offset():
    text = '{"name": "py\nthon", "arguments": {}}'
    fails(tag_parser(), text, "at character 12: raw control character U+000A inside a string")
    fails(JsonFieldsParser(), '{"a\tb": 1}', "at character 3: raw control character U+0009")


def test_a_raw_newline_in_streamed_code_fails_after_the_statements_before_it():
    text = '{"name": "python", "arguments": {"code": "a = 1\\nb = 2\\nc = 3\nd = 4\\n"}}'
    for cuts in ([], range(len(text)), [20, 45, 47]):
        units = fails(tag_parser(), text, "U+000A", cuts)
        assert [u[1] for u in units] == ["a = 1\n", "b = 2\n"]


def test_no_unit_ever_holds_json_that_json_loads_rejects():
    text = '{"q": "ok", "r": "bad\x01", "s": 2}'
    units = fails(JsonFieldsParser(), text, "U+0001")
    assert [u[2] for u in units] == ["q"]
    for _, raw, _ in units:
        json.loads(raw)


# ---- 2. keys given twice, deep nesting ---------------------------------------


def test_a_command_field_given_twice_is_a_parse_failure_naming_it():
    text = json.dumps({"code": "a=1\n"})[:-1] + ', "code": "b=2\\n"}'
    for cuts in ([], range(len(text))):
        units = fails(JsonFieldsParser("code"), text, "duplicate key 'code'", cuts)
        assert [u[1] for u in units] == ["a=1\n"]  # the first one's units may already run


@pytest.mark.parametrize(
    "text",
    ['{"q": 1, "q": 2}', '{"q": [1], "r": 0, "q": [2]}', '{"q": 1, "\\u0071": 2}'],
    ids=["plain", "array", "escaped"],
)
def test_a_top_level_field_given_twice_is_a_parse_failure(text):
    units = fails(JsonFieldsParser(), text, "duplicate key 'q'")
    assert "q" in [u[2] for u in units]


def test_a_tool_call_with_two_names_or_two_argument_objects_fails():
    fails(tag_parser(), '{"name": "python", "name": "search", "arguments": {}}', "duplicate key")
    code = '{"code": "a=1\\n"}'
    text = '{"name": "python", "arguments": ' + code + ', "arguments": ' + code + "}"
    units = fails(tag_parser(), text, "duplicate key 'arguments'")
    assert [u[1] for u in units] == ["a=1\n"]


def nested(depth: int) -> str:
    """An object whose "q" nests arrays so that the whole is `depth` deep."""
    return '{"q": ' + "[" * (depth - 1) + "]" * (depth - 1) + "}"


def test_nesting_is_bounded_with_a_clear_message():
    ok = nested(MAX_DEPTH)
    units = feed_all(JsonFieldsParser(), ok)
    assert json.loads(units[-1][1]) == json.loads(ok)["q"]
    message = f"nested deeper than {MAX_DEPTH}"
    fails(JsonFieldsParser(), nested(MAX_DEPTH + 1), message)
    fails(JsonFieldsParser(), '{"q": ' + "[" * 10_000 + "]" * 10_000 + "}", message)
    fails(JsonFieldsParser("code"), '{"x": ' + '{"y": ' * 10_000, message)
    # Inside a tool call the arguments object may nest exactly as deep.
    call = '{"name": "search", "arguments": ' + ok + "}"
    assert json.loads(feed_all(tag_parser(), call)[-1][1]) == json.loads(ok)["q"]
    too_deep = '{"name": "search", "arguments": ' + nested(MAX_DEPTH + 1) + "}"
    fails(tag_parser(), too_deep, message)
    fails(tag_parser(), '{"name": ' + "[" * 10_000, message)


# ---- 3. the units before an error do not depend on the split ------------------


def test_the_feed_that_meets_an_error_returns_the_units_before_it():
    parser = JsonFieldsParser()
    units = parser.feed('{"a": 1, "b": 2, "c": tru}')
    assert [u.field for u in units] == ["a", "b"]
    with pytest.raises(ParseFailure, match="invalid literal 'tru'"):
        parser.feed("more")
    with pytest.raises(ParseFailure, match="invalid literal 'tru'"):
        parser.finish()  # and every call after


def test_finish_raises_a_kept_failure():
    parser = PythonStatementParser()
    assert [u.text for u in parser.feed("a = 1\nb = '\x00'\n")] == ["a = 1\n"]
    with pytest.raises(ParseFailure, match="null character"):
        parser.finish()


CODE_LINES = st.lists(
    st.sampled_from(["a = 1", "print(a)", "if a:", "    b = [1,", "    2]", "# c", "", "x = 'y'"]),
    max_size=8,
).map(lambda lines: "\n".join(lines) + "\n")
JSON_ARGS = st.dictionaries(
    st.sampled_from(["q", "code", "n", "xs", "o"]),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=8),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
        max_leaves=8,
    ),
    max_size=4,
)
CORRUPTIONS = ["\n", "\x00", "\x1f", '"', ",", ":", "}", "]", "{", "[", "\\", "x", "1", "\\u12"]


@st.composite
def malformed(draw):
    """A parser and a text that is well formed up to a corruption."""
    name = draw(st.sampled_from(sorted(SPLIT_SAFE)))
    if name == "python":
        text = draw(CODE_LINES)
    elif name == "json_fields":
        text = json.dumps(draw(JSON_ARGS), ensure_ascii=draw(st.booleans()))
    else:
        code = draw(CODE_LINES)
        if name == "json_code":
            rest = {k: v for k, v in draw(JSON_ARGS).items() if k != "code"}
            text = json.dumps({"code": code, **rest})
        else:
            text = python_call(code)
    at = draw(st.integers(draw(st.sampled_from([0, len(text) // 2])), len(text)))
    corruption = "\x00" if name == "python" else draw(st.sampled_from(CORRUPTIONS))
    if draw(st.booleans()) and name != "python":
        text = text[:at] + text[at + 1 :]  # a character dropped
    else:
        text = text[:at] + corruption + text[at:]
    return name, text


@settings(max_examples=400, deadline=None)
@given(malformed(), st.data())
def test_units_before_an_error_are_the_same_for_any_split(case, data):
    name, text = case
    make = SPLIT_SAFE[name]
    whole = collect(make(), text)
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=12))
    assert collect(make(), text, cuts) == whole
    assert collect(make(), text, range(len(text))) == whole


def test_units_completed_in_the_failing_delta_are_not_lost():
    text = '{"code": "a = 1\\nb = 2\\n", "code": "c"}'
    assert collect(JsonFieldsParser("code"), text)[0] == [
        (0, "a = 1\n", "code"),
        (1, "b = 2\n", "code"),
    ]
    call = '{"name": "search", "arguments": {"q": "a", "r": [1, 2], "s": "\n"}}'
    whole = collect(tag_parser(), call)
    assert [u[2] for u in whole[0]] == ["q", "r[0]", "r[1]", "r"]
    assert collect(tag_parser(), call, range(len(call))) == whole


# ---- only ParseFailure, ever ---------------------------------------------------

PIECES = st.sampled_from(
    [
        "{",
        "}",
        "[",
        "]",
        '"',
        ":",
        ",",
        "\\",
        "\\u",
        "d800",
        "\\ud83d",
        "true",
        "nul",
        "-1.5e3",
        "1" * 5000,
        "\n",
        "\r",
        "\r\n",
        "\x00",
        "\x0c",
        "\t",
        " ",
        '"name"',
        '"arguments"',
        '"python"',
        '"search"',
        '"code"',
        '"cmd"',
        "'",
        "'''",
        "#",
        "if x:",
        "    ",
        "1. tool($1)",
        "$",
        ";",
        "--",
        "/*",
        "[" * 300,
        "{" * 300,
        "é",
        "\U0001f680",
    ]
)
CALLS = st.builds(
    lambda name, args: json.dumps({"name": name, "arguments": args}),
    st.sampled_from(sorted(TOOLS)),
    st.fixed_dictionaries({}, optional={"code": CODE_LINES, "cmd": st.text(max_size=20)}),
)


@st.composite
def mutated(draw, texts):
    """A text with a few pieces put in, or characters taken out, anywhere."""
    text = draw(texts)
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(text)))
        if draw(st.booleans()):
            text = text[:at] + draw(PIECES | st.sampled_from(CONTROLS)) + text[at:]
        else:
            text = text[:at] + text[at + draw(st.integers(1, 3)) :]
    return text


GARBAGE = st.one_of(
    st.text(max_size=200),
    st.lists(PIECES, max_size=40).map("".join),
    st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
    mutated(CALLS),
    mutated(CODE_LINES),
)


@settings(max_examples=400, deadline=None)
@given(GARBAGE, st.lists(st.integers(0, 200), max_size=8))
def test_arbitrary_text_only_ever_raises_parse_failure(text, cuts):
    cuts = [c for c in cuts if c <= len(text)]
    for make in every_parser().values():
        collect(make(), text, cuts)  # anything but ParseFailure propagates
        collect(make(), text)
    for make in SPLIT_SAFE.values():
        assert collect(make(), text, cuts) == collect(make(), text)


@pytest.mark.parametrize("name", sorted(every_parser()))
def test_deep_and_long_inputs_only_raise_parse_failure(name):
    make = every_parser()[name]
    for text in (
        "[" * 100_000,
        "{" * 100_000,
        '{"q": ' + "[" * 100_000 + "]" * 100_000 + "}",
        '{"name": ' + "[" * 10_000 + "]" * 10_000 + ', "arguments": {}}',
        '{"name": "python", "arguments": {"code": "", "x": ' + "[" * 10_000 + "]" * 10_000 + "}}",
        '{"cmd": ' + "[" * 100_000,
        '{"name": "python", "arguments": {"code": ' + "[" * 100_000,
        '{"q": ' + "1" * 10_000 + "}",
        "(" * 100_000,
        "x = " + "-" * 100_000 + "1\n",
    ):
        collect(make(), text)
        collect(make(), text, range(0, len(text), 7))


# ---- 4. Python: form feeds, CRLF and CR line ends -----------------------------


def python_units(text: str, cuts=()) -> list[str]:
    return [u[1] for u in feed_all(PythonStatementParser(), text, cuts)]


def test_a_form_feed_at_the_start_of_a_line_is_no_indentation():
    text = "a = 1\n\fb = 2\nc = 3\n"
    assert python_units(text) == ["a = 1\n", "\fb = 2\n", "c = 3\n"]
    # It resets the column: what follows it is the line's indentation.
    text = "if a:\n\f    b = 2\n  \fc = 3\n"
    assert python_units(text) == ["if a:\n\f    b = 2\n", "  \fc = 3\n"]


def test_a_backslash_continuation_before_crlf_or_cr():
    for eol in ("\r\n", "\r", "\n"):
        text = f"x = 1 + \\{eol}    2{eol}y = x{eol}"
        assert python_units(text) == [f"x = 1 + \\{eol}    2{eol}", f"y = x{eol}"]
        assert python_units(text, range(len(text))) == python_units(text)


def test_cr_only_line_ends_are_line_ends():
    text = "a = 1\rb = 2\rif a:\r    c = 3\rd = 4"
    assert python_units(text) == ["a = 1\r", "b = 2\r", "if a:\r    c = 3\r", "d = 4"]
    parser = PythonStatementParser()
    assert [u.text for u in parser.feed("a = 1\r")] == []  # a "\n" may follow
    assert [u.text for u in parser.feed("\nb")] == ["a = 1\r\n"]
    parser = PythonStatementParser()
    parser.feed("a = 1\r")
    assert [u.text for u in parser.feed("b")] == ["a = 1\r"]
    assert [u.text for u in parser.finish()] == ["b"]


def test_a_string_continued_by_backslash_crlf():
    text = "s = 'a\\\r\nb'\r\nt = 1\r\n"
    assert python_units(text) == ["s = 'a\\\r\nb'\r\n", "t = 1\r\n"]


SIMPLE = ["a = 1", "print(a)", "x = [1,{eol}  2]", "y = 1 + \\{eol}    2", "s = '''p{eol}q'''"]
COMPOUND = [
    "if a:{eol}{ff}    b = 2{eol}else:{eol}    b = 3",
    "def f():{eol}    return 1",
    "for i in []:{eol}{ff}    pass",
    "@dec{eol}{ff}class C:{eol}    x = 1",
]
FILLER = ["", "# note", "{ff}# ff note", "{ff}"]


@st.composite
def python_programs(draw):
    eols = draw(st.lists(st.sampled_from(["\n", "\r\n", "\r"]), min_size=1, max_size=3))
    parts = []
    for _ in range(draw(st.integers(1, 8))):
        template = draw(st.sampled_from(SIMPLE + COMPOUND + FILLER))
        ff = draw(st.sampled_from(["", "\f", " \f", "\f\f"]))
        lead = draw(st.sampled_from(["", "\f", "  \f"]))
        eol = draw(st.sampled_from(eols))
        parts.append(lead + template.format(eol=eol, ff=ff) + eol)
    text = "".join(parts)
    if draw(st.booleans()):
        text = text.rstrip("\r\n")  # no line end at the very end
    return text


@settings(max_examples=300, deadline=None)
@given(python_programs(), st.data())
def test_python_units_match_ast_with_form_feeds_and_any_line_ends(text, data):
    tree = ast.parse(text)
    units = python_units(text)
    joined = "".join(units)
    assert text.startswith(joined)
    assert ast.parse(text[len(joined) :]).body == []  # at most blank and comment lines left
    assert len(units) == len(tree.body)
    dumps = [ast.dump(s) for u in units for s in ast.parse(u).body]
    assert dumps == [ast.dump(s) for s in tree.body]
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=20))
    assert python_units(text, cuts) == units
    assert python_units(text, range(len(text))) == units


def test_a_statement_too_deep_to_compile_is_a_parse_failure():
    from scheduler.parsers import check_unit

    with pytest.raises(ParseFailure, match="cannot be compiled"):
        check_unit("PYTHON_STATEMENTS", "x = " + "-" * 100_000 + "1")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 80), max_size=20))
def test_plan_steps_before_an_error_are_handed_out_for_any_split(cuts):
    from scheduler.parsers import PlanStepParser

    text = '$1 = search("a")\n$2 = search("b")\n$3 = search("c" ]\n$4 = join()\n'
    units, failed = [], False
    parser, start = PlanStepParser(), 0
    try:
        for cut in [*sorted(set(c for c in cuts if c < len(text))), len(text)]:
            units += parser.feed(text[start:cut])
            start = cut
        units += parser.finish()
    except ParseFailure:
        failed = True
    assert failed
    assert [u.field for u in units] == ["1", "2"]
