"""Incremental unit parsers: each is fed every delta of a call's text once and
emits command units the moment they are complete."""

from scheduler.parsers.base import ParsedUnit, UnitParser, WholeParser, parser_for
from scheduler.parsers.python_statements import PythonStatementParser

__all__ = ["ParsedUnit", "PythonStatementParser", "UnitParser", "WholeParser", "parser_for"]
