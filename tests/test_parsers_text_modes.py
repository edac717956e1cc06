"""The lines, SQL statement and plan step parsers: exact units, emitted at the
delta that completes them, whatever the delta split."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scheduler.parsers.base import ParsedUnit, ParseFailure
from scheduler.parsers.lines import LinesParser
from scheduler.parsers.plan_steps import PlanStepParser, split_call
from scheduler.parsers.sql_statements import SqlStatementParser

PARSERS = [LinesParser, SqlStatementParser, PlanStepParser]


def parse(parser_cls, text: str, cuts: list[int] | None = None) -> list[ParsedUnit]:
    """Feeds `text` cut at `cuts`; checks the units are numbered in order."""
    parser = parser_cls()
    units, start = [], 0
    for cut in sorted(set(cuts or [])) + [len(text)]:
        units += parser.feed(text[start:cut])
        start = cut
    units += parser.finish()
    assert [u.index for u in units] == list(range(len(units)))
    return units


def by_char(parser_cls, text: str) -> list[ParsedUnit]:
    return parse(parser_cls, text, list(range(len(text))))


def emitted_at(parser_cls, text: str) -> list[tuple[int, ParsedUnit]]:
    """(position of the char whose one-char delta completed the unit, unit);
    len(text) for units that finish() returned."""
    parser = parser_cls()
    out = [(i, u) for i, ch in enumerate(text) for u in parser.feed(ch)]
    return out + [(len(text), u) for u in parser.finish()]


def outcome(parser_cls, text: str, cuts: list[int] | None = None):
    try:
        return parse(parser_cls, text, cuts)
    except ParseFailure:
        return "ParseFailure"


def texts(units: list[ParsedUnit]) -> list[str]:
    return [u.text for u in units]


# ---- lines -----------------------------------------------------------------


def test_lines_complete_at_their_newline():
    parser = LinesParser()
    assert parser.feed("weather in ") == []
    assert texts(parser.feed("Paris\nweather in")) == ["weather in Paris"]
    assert texts(parser.feed(" London\n")) == ["weather in London"]
    assert parser.finish() == []


def test_lines_blank_lines_crlf_and_a_last_line_without_newline():
    text = "ls -la\r\n\r\n   \n\t\ncd /tmp  \r\n\nfind . -name '*.py'"
    expected = ["ls -la", "cd /tmp  ", "find . -name '*.py'"]
    assert texts(parse(LinesParser, text)) == expected
    assert texts(by_char(LinesParser, text)) == expected
    parser = LinesParser()
    assert texts(parser.feed("echo hi\r")) == []
    assert texts(parser.feed("\n")) == ["echo hi"]  # \r and \n in different deltas
    assert texts(parser.finish()) == []
    assert texts(parse(LinesParser, "last\r")) == ["last"]
    assert parse(LinesParser, "") == [] and parse(LinesParser, " \n\r\n ") == []


# ---- SQL -------------------------------------------------------------------


def test_sql_semicolons_in_strings_identifiers_and_comments_do_not_end_statements():
    text = (
        "SELECT 'a;b' AS \"col;1\" FROM t; -- note; not a statement\n"
        "/* block ; comment\n still; */ INSERT INTO t VALUES ('it''s; fine', \"x\"\"y;\");\n"
        "UPDATE t SET a = 1 - 2 / 3 WHERE b = 'c' -- trailing; comment\n;"
    )
    assert texts(parse(SqlStatementParser, text)) == [
        "SELECT 'a;b' AS \"col;1\" FROM t;",
        "-- note; not a statement\n/* block ; comment\n still; */ "
        "INSERT INTO t VALUES ('it''s; fine', \"x\"\"y;\");",
        "UPDATE t SET a = 1 - 2 / 3 WHERE b = 'c' -- trailing; comment\n;",
    ]


def test_sql_statement_is_emitted_at_its_semicolon():
    parser = SqlStatementParser()
    assert parser.feed("SELECT 1") == []
    assert texts(parser.feed(";\n  SELECT 'x''")) == ["SELECT 1;"]
    assert parser.feed(";") == []  # still inside 'x'';
    assert texts(parser.feed("';")) == ["SELECT 'x'';';"]
    assert parser.finish() == []


def test_sql_escaped_quote_split_across_deltas():
    parser = SqlStatementParser()
    assert parser.feed("SELECT 'a'") == []
    assert parser.feed("';") == []  # '' is a quote: the string goes on
    assert texts(parser.feed("';")) == ["SELECT 'a'';';"]


def test_sql_empty_statements_and_finish():
    assert texts(parse(SqlStatementParser, ";;  ; -- c\n;")) == []
    assert texts(parse(SqlStatementParser, "SELECT 1;\n  SELECT 2  \n")) == [
        "SELECT 1;",
        "SELECT 2",
    ]
    assert texts(parse(SqlStatementParser, "SELECT 1; -- done\n/* bye */\n")) == ["SELECT 1;"]
    assert texts(parse(SqlStatementParser, "SELECT 4 -")) == ["SELECT 4 -"]
    assert texts(parse(SqlStatementParser, "/*/ still a comment */ SELECT 1")) == [
        "/*/ still a comment */ SELECT 1"
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("SELECT 1;\nSELECT 'abc;\n", "unterminated string starting at line 2"),
        ("SELECT 'a''\n'';", "unterminated string starting at line 1"),
        ('SELECT 1;\n\nSELECT "col', "unterminated quoted identifier starting at line 3"),
        ("SELECT 1; /* x\n\n", "unterminated block comment starting at line 1"),
        ("SELECT 1;\n/", None),  # a lone "/" is code
    ],
)
def test_sql_unterminated_at_finish(text, message):
    for cuts in ([], list(range(len(text)))):
        if message is None:
            assert texts(parse(SqlStatementParser, text, cuts)) == ["SELECT 1;", "/"]
            continue
        with pytest.raises(ParseFailure, match=message):
            parse(SqlStatementParser, text, cuts)


# ---- plan steps --------------------------------------------------------------


PLAN = (
    "Thought: I need the weather (in two cities), then compare.\n"
    '1. search("weather in Paris")\n'
    "2. search('weather in \\'London\\'')\n"
    "\n"
    "$3 = compare(\n"
    '    "Paris: $1 (today)",\n'
    "    [${2}, {'k': ')]}'}],\n"
    ")  # trailing comment (ignored\n"
    "Some prose that is not a step.\n"
    "4. join()\n"
    "<END_OF_PLAN>"
)


def test_plan_steps_both_forms_and_multiline_arguments():
    units = parse(PlanStepParser, PLAN)
    assert units == [
        ParsedUnit(0, 'search("weather in Paris")', "1", ()),
        ParsedUnit(1, "search('weather in \\'London\\'')", "2", ()),
        ParsedUnit(
            2, "compare(\n    \"Paris: $1 (today)\",\n    [${2}, {'k': ')]}'}],\n)", "3", (1, 2)
        ),
        ParsedUnit(3, "join()", "4", ()),
    ]
    assert by_char(PlanStepParser, PLAN) == units


def test_plan_step_is_emitted_at_the_newline_after_its_closing_parenthesis():
    parser = PlanStepParser()
    assert parser.feed("$1 = search(") == []
    assert parser.feed('"a)"') == []
    assert parser.feed(")") == []  # complete only at the newline
    assert texts(parser.feed("\n$2 = f($1")) == ['search("a)")']
    assert parser.feed(")") == []
    assert parser.finish() == [ParsedUnit(1, "f($1)", "2", (1,))]


def test_plan_dependencies():
    text = (
        "$1 = a()\n$2 = b()\n$3 = c()\n"
        "$10 = d(${2}, $1, $1, '$3', ${3})\n"
        "11. e($10)\n"
        "12) f()\n"
        "${13} = g([$12])\n"
    )
    units = parse(PlanStepParser, text)
    assert [(u.field, u.depends_on) for u in units] == [
        ("1", ()),
        ("2", ()),
        ("3", ()),
        ("10", (1, 2, 3)),
        ("11", (10,)),
        ("12", ()),
        ("13", (12,)),
    ]


def test_plan_triple_quoted_strings_may_span_lines():
    text = '1. python("""\nprint(")")\n""")\n2. join()\n'
    assert texts(parse(PlanStepParser, text)) == ['python("""\nprint(")")\n""")', "join()"]
    assert parse(PlanStepParser, "1. f('', \"\")\n")[0].text == "f('', \"\")"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1. a()\n2. b($2)\n", r"step 2 .*depends on \$2"),
        ("1. a($3)\n2. b()\n3. c()\n", r"step 1 .*depends on \$3"),
        ("$1 = a()\n$2 = b(${5}, $1)\n", r"step 2 .*depends on \$5"),
        ("1. a()\n2. b()\n1. c()\n", "step 1 on line 3 repeats"),
        ("$1 = a()\n1. c()\n", "step 1 on line 2 repeats"),
        ("1. a(\n\n", "step 1 starting at line 1 is not closed"),
        ("\n1. a([)]\n", r"step 1: '\)' on line 2 does not close '\['"),
        ("1. a('x\n')\n", "step 1: a string is not closed at the end of line 1"),
        ('1. a("""x)\n', "step 1 starting at line 1 has an unterminated string"),
        ("1. a('x\\", "unterminated string"),
    ],
)
def test_plan_failures(text, message):
    for cuts in ([], list(range(len(text)))):
        with pytest.raises(ParseFailure, match=message):
            parse(PlanStepParser, text, cuts)


def test_plan_lines_that_are_not_steps():
    text = (
        "Plan:\n"
        "2023 (a year) was warm.\n"
        "1. First, search (the web)\n"
        "$x = f()\n"
        "- 1. g()\n"
        "1. no call here\n"
        "   1.   search  ( 'indented' )  \n"
    )
    assert parse(PlanStepParser, text) == [ParsedUnit(0, "search  ( 'indented' )", "1", ())]


def test_split_call():
    assert split_call('search("weather in Paris")') == ("search", '"weather in Paris"')
    assert split_call("join()") == ("join", "")
    assert split_call("f(\n  $1, (2)\n)") == ("f", "\n  $1, (2)\n")
    assert split_call("tools.web_search ( 'x' ) ") == ("tools.web_search", " 'x' ")
    for bad in ["", "search", '"x"(1)', "f(1) + 2"]:
        with pytest.raises(ParseFailure):
            split_call(bad)


# ---- generated inputs ------------------------------------------------------

cuts_st = st.lists(st.integers(0, 10_000), max_size=40)


@st.composite
def line_texts(draw) -> tuple[str, list[str], list[int]]:
    """(text, expected units, positions of the newlines that complete them)."""
    lines = draw(st.lists(st.text(st.characters(exclude_characters="\r\n")), max_size=12))
    parts, expected, ends, length = [], [], [], 0
    for k, line in enumerate(lines):
        last = k == len(lines) - 1
        ending = draw(st.sampled_from(["", "\n", "\r\n"] if last else ["\n", "\r\n"]))
        parts.append(line + ending)
        length += len(line) + len(ending)
        if line.strip():
            expected.append(line)
            ends.append(length - 1 if ending else length)
    return "".join(parts), expected, ends


_SQL_WORDS = ["SELECT", "a", "t.b", "FROM", "t", "WHERE", "=", "-", "/", "*", "1", "(", ")", ","]


def _sql_string(draw, quote: str) -> str:
    body = draw(st.text(st.sampled_from(list("ab ;-/*\n'\"")), max_size=12))
    return quote + body.replace(quote, quote * 2) + quote


@st.composite
def sql_texts(draw) -> tuple[str, list[str], list[int]]:
    """(SQL text, expected units, positions of the chars that complete them)."""

    def token() -> str:
        kind = draw(st.sampled_from(["word", "word", "word", "string", "ident", "line", "block"]))
        if kind == "word":
            return draw(st.sampled_from(_SQL_WORDS))
        if kind == "string":
            return _sql_string(draw, "'")
        if kind == "ident":
            return _sql_string(draw, '"')
        if kind == "line":
            return "--" + draw(st.text(st.sampled_from(list("ab ;'\"/*-")), max_size=8)) + "\n"
        body = draw(st.text(st.sampled_from(list("ab ;'\"-\n/")), max_size=8))
        return "/*" + body + "*/"

    def spaces() -> str:
        return draw(st.sampled_from(["", " ", "\n", "  \t", "\r\n"]))

    parts, expected, ends, length = [], [], [], 0
    for _ in range(draw(st.integers(0, 6))):
        leading_comments = draw(st.sampled_from(["", "-- c;\n", "/* ; */ "]))
        body = " ".join(draw(st.sampled_from(_SQL_WORDS[:5])) for _ in range(2))
        body += " " + " ".join(token() for _ in range(draw(st.integers(0, 5))))
        statement = spaces() + leading_comments + body + " ;"
        parts.append(statement)
        length += len(statement)
        expected.append(statement.lstrip())
        ends.append(length - 1)
    tail = draw(st.sampled_from(["", " ", "\n-- end\n", " /* x; */", "SELECT 'x;' -- y"]))
    parts.append(tail)
    if tail.startswith("SELECT"):
        expected.append(tail.strip())
        ends.append(length + len(tail))
    return "".join(parts), expected, ends


_TOOLS = ["search", "math", "llm_call", "join", "tools.fetch"]


@st.composite
def plan_texts(draw) -> tuple[str, list[ParsedUnit], list[int]]:
    """(plan text, expected units, positions of the chars that complete them)."""
    parts: list[str] = []
    expected: list[ParsedUnit] = []
    ends: list[int] = []
    ids: list[int] = []
    length = 0

    def add(text: str) -> None:
        nonlocal length
        parts.append(text)
        length += len(text)

    def string(refs: set[int]) -> str:
        quote = draw(st.sampled_from(["'", '"', '"""']))
        pieces = []
        for _ in range(draw(st.integers(0, 6))):
            kind = draw(st.sampled_from(["plain", "plain", "escape", "other", "ref", "newline"]))
            if kind == "plain":
                pieces.append(draw(st.text(st.sampled_from(list("ab ()[]{},;#=:.")), max_size=6)))
            elif kind == "escape":
                pieces.append("\\" + draw(st.sampled_from(["\\", "'", '"', "n"])))
            elif kind == "other":
                pieces.append("'" if quote == '"' else '"' if quote == "'" else "'")
            elif kind == "ref" and ids:
                ref = draw(st.sampled_from(ids))
                refs.add(ref)
                pieces.append(f"${ref} ")
            elif kind == "newline" and quote == '"""':
                pieces.append("\n")
        return quote + "".join(pieces) + quote

    def value(refs: set[int], depth: int) -> str:
        kinds = ["number", "string", "ref", "braced"] + (["list", "dict"] if depth < 2 else [])
        kind = draw(st.sampled_from(kinds))
        if kind == "number":
            return str(draw(st.integers(0, 99)))
        if kind == "string":
            return string(refs)
        if kind in ("ref", "braced"):
            if not ids:
                return "None"
            ref = draw(st.sampled_from(ids))
            refs.add(ref)
            return f"${ref}" if kind == "ref" else f"${{{ref}}}"
        items = [value(refs, depth + 1) for _ in range(draw(st.integers(0, 3)))]
        if kind == "list":
            return "[" + ", ".join(items) + "]"
        return "{" + ", ".join(f"'k{k}': {v}" for k, v in enumerate(items)) + "}"

    step_id = 0
    count = draw(st.integers(0, 7))
    for k in range(count):
        for _ in range(draw(st.integers(0, 2))):
            add(
                draw(
                    st.sampled_from(
                        [
                            "\n",
                            "Thought: search (first) then [compare]. 'quote\n",
                            "Plan:\n",
                            "  \n",
                            "2024 (a year)\n",
                        ]
                    )
                )
            )
        step_id += draw(st.integers(1, 3))
        refs: set[int] = set()
        tool = "join" if k == count - 1 and draw(st.booleans()) else draw(st.sampled_from(_TOOLS))
        args = [value(refs, 0) for _ in range(draw(st.integers(0, 3)))]
        separator = draw(st.sampled_from([", ", ",\n    ", ",", " ,\n"]))
        arg_text = separator.join(args)
        if draw(st.booleans()):
            arg_text = "\n    " + arg_text + ",\n"
        call = f"{tool}({arg_text})"
        header = draw(st.sampled_from([f"{step_id}. ", f"${step_id} = ", f"${{{step_id}}} = "]))
        add(draw(st.sampled_from(["", "  "])) + header + call)
        add(draw(st.sampled_from(["", "  ", "  # why (not"])))
        last = k == count - 1
        newline = draw(st.sampled_from(["", "\n"])) if last else "\n"
        add(newline)
        expected.append(ParsedUnit(k, call, str(step_id), tuple(sorted(refs))))
        ends.append(length - 1 if newline else length)
        ids.append(step_id)
    if parts and parts[-1] == "\n" and draw(st.booleans()):
        add("<END_OF_PLAN>")
    return "".join(parts), expected, ends


SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(line_texts(), cuts_st)
def test_lines_any_split_gives_the_same_units(case, cuts):
    text, expected, ends = case
    assert texts(parse(LinesParser, text)) == expected
    assert texts(parse(LinesParser, text, [c % (len(text) + 1) for c in cuts])) == expected
    assert [(i, u.text) for i, u in emitted_at(LinesParser, text)] == list(
        zip(ends, expected, strict=True)
    )


@SETTINGS
@given(sql_texts(), cuts_st)
def test_sql_any_split_gives_the_same_units(case, cuts):
    text, expected, ends = case
    assert texts(parse(SqlStatementParser, text)) == expected
    assert texts(parse(SqlStatementParser, text, [c % (len(text) + 1) for c in cuts])) == expected
    assert [(i, u.text) for i, u in emitted_at(SqlStatementParser, text)] == list(
        zip(ends, expected, strict=True)
    )


@SETTINGS
@given(plan_texts(), cuts_st)
def test_plans_any_split_gives_the_same_units(case, cuts):
    text, expected, ends = case
    assert parse(PlanStepParser, text) == expected
    assert parse(PlanStepParser, text, [c % (len(text) + 1) for c in cuts]) == expected
    assert emitted_at(PlanStepParser, text) == list(zip(ends, expected, strict=True))
    for unit in expected:
        name, args = split_call(unit.text)
        assert unit.text == f"{name}({args})"


@settings(max_examples=100, deadline=None)
@given(plan_texts(), st.data())
def test_plans_with_a_forward_or_repeated_id_fail(case, data):
    text, expected, _ = case
    if not expected:
        return
    victim = data.draw(st.sampled_from(expected))
    own = int(victim.field)
    if data.draw(st.booleans()):  # depend on itself or a later step
        later = own + data.draw(st.integers(0, 3))
        bad = victim.text[:-1] + ("" if victim.text[-2] == "(" else ", ") + f"${later})"
        text = text.replace(victim.text, bad, 1)
    else:  # repeat its id as the last step
        text = text.replace("<END_OF_PLAN>", "") + f"\n{own}. again()\n"
    with pytest.raises(ParseFailure):
        parse(PlanStepParser, text)
    with pytest.raises(ParseFailure):
        by_char(PlanStepParser, text)


# ---- fuzz: arbitrary text ----------------------------------------------------


def _pieces(*pieces: str) -> st.SearchStrategy[str]:
    return st.lists(st.sampled_from(pieces), max_size=30).map("".join)


FUZZ_TEXTS = {
    LinesParser: st.text(st.sampled_from(list("ab \t\r\n")), max_size=60),
    SqlStatementParser: _pieces("a", " ", ";", "'", '"', "-", "/", "*", "\n", "''", "--", "/*"),
    PlanStepParser: _pieces(
        "1. f(",
        "1. f()\n",
        "$2 = g($1)\n",
        "Thought: (\n",
        "$2 = g(",
        "${3} = h(",
        "2. ",
        "$1",
        "${2}",
        "(",
        ")",
        "[",
        "]",
        "{",
        "}",
        "'",
        '"',
        '"""',
        "\\",
        "a",
        " ",
        ",",
        "\n",
        ")\n",
        "#",
    ),
}


@pytest.mark.parametrize("parser_cls", PARSERS, ids=lambda c: c.__name__)
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_arbitrary_text_fails_only_with_parse_failure_and_splits_agree(parser_cls, data):
    text = data.draw(st.one_of(st.text(), FUZZ_TEXTS[parser_cls]), label="text")
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=20), label="cuts")
    whole = outcome(parser_cls, text)
    assert outcome(parser_cls, text, cuts) == whole
    assert outcome(parser_cls, text, list(range(len(text)))) == whole
