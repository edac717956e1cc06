"""Incremental unit parsers: each is fed every delta of a call's text once and
emits command units the moment they are complete (see ARCHITECTURE.md, "What
a command unit is")."""

from __future__ import annotations

from conveyor_common.types import PartialMode
from scheduler.parsers.base import ParsedUnit, ParseFailure, UnitParser, WholeParser
from scheduler.parsers.json_fields import JsonFieldsParser
from scheduler.parsers.lines import LinesParser
from scheduler.parsers.plan_steps import PlanStepParser
from scheduler.parsers.python_statements import PythonStatementParser
from scheduler.parsers.sql_statements import SqlStatementParser
from scheduler.parsers.tool_call_tag import ToolCallTagParser

_BY_MODE = {
    PartialMode.PYTHON_STATEMENTS: PythonStatementParser,
    PartialMode.LINES: LinesParser,
    PartialMode.PLAN_STEPS: PlanStepParser,
    PartialMode.SQL_STATEMENTS: SqlStatementParser,
    PartialMode.WHOLE: WholeParser,
}


def parser_for(partial_mode: PartialMode, command_field: str = "") -> UnitParser:
    """A fresh parser for a command written as plain text (a fenced block),
    or, for JSON_FIELDS, for an arguments object."""
    if partial_mode == PartialMode.JSON_FIELDS:
        return JsonFieldsParser(command_field)
    return _BY_MODE.get(partial_mode, WholeParser)()


def arguments_parser_for(partial_mode: PartialMode, command_field: str = "") -> UnitParser:
    """A fresh parser for a tool's arguments object as a JSON tool call
    carries it: the command field streams into the mode's parser; JSON_FIELDS
    tools get their fields; any other tool gets the whole arguments text."""
    if command_field:
        return JsonFieldsParser(command_field, parser_for(partial_mode))
    if partial_mode == PartialMode.JSON_FIELDS:
        return JsonFieldsParser()
    return WholeParser()


def check_unit(partial_mode: PartialMode, text: str) -> None:
    """Rejects a unit that cannot run before it is sent: a Python statement
    that does not compile becomes a parse error of its call, not a unit."""
    if partial_mode != PartialMode.PYTHON_STATEMENTS:
        return
    try:
        compile(text, "<unit>", "exec", dont_inherit=True)
    except (MemoryError, RecursionError, ValueError) as e:  # too deep for the compiler
        raise ParseFailure(f"Python statement cannot be compiled: {type(e).__name__}") from None
    except SyntaxError as e:
        first = text.strip().splitlines()[0][:60] if text.strip() else ""
        raise ParseFailure(
            f"Python syntax error in statement {first!r}: {e.msg} (line {e.lineno})"
        ) from None


__all__ = [
    "JsonFieldsParser",
    "LinesParser",
    "ParseFailure",
    "ParsedUnit",
    "PlanStepParser",
    "PythonStatementParser",
    "SqlStatementParser",
    "ToolCallTagParser",
    "UnitParser",
    "WholeParser",
    "arguments_parser_for",
    "check_unit",
    "parser_for",
]
