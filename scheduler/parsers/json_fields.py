"""PARTIAL_MODE_JSON_FIELDS: a unit per complete top-level field of the
arguments object, and one per complete element of an array field (emitted
before the field itself, field name "name[i]").

With a `command_field` ("code" for the python tool) the parser instead streams
that field's string, decoded character by character, into the command's own
parser (Python statements, say) and emits only the command's units: the first
statement runs while the JSON string that holds the rest is still arriving.

A key given twice, nesting deeper than `json_stream.MAX_DEPTH`, or a raw
control character in a string is a ParseFailure, deferred as UnitParser says
(the units before the error are handed out first, for any split).
"""

from __future__ import annotations

from scheduler.parsers.base import ParsedUnit, ParseFailure, UnitParser
from scheduler.parsers.json_stream import Chunk, Element, Field, JsonObjectScanner


class JsonFieldsParser:
    def __init__(self, command_field: str = "", command_parser: UnitParser | None = None):
        self._command_field = command_field
        if command_field and command_parser is None:
            from scheduler.parsers.python_statements import PythonStatementParser

            command_parser = PythonStatementParser()
        self._command = command_parser
        self._seen_command = False
        self._command_open = False  # fed, not finished
        self._scanner = JsonObjectScanner(
            stream_keys=frozenset({command_field}) if command_field else frozenset(),
            elements=not command_field,
        )
        self._index = 0
        self._failure: str | None = None  # kept: the next feed() or finish() raises it

    def _unit(self, text: str, field: str) -> ParsedUnit:
        unit = ParsedUnit(self._index, text, field)
        self._index += 1
        return unit

    def _command_units(self, units: list[ParsedUnit]) -> list[ParsedUnit]:
        return [self._unit(u.text, self._command_field) for u in units]

    def feed(self, text: str) -> list[ParsedUnit]:
        if self._failure is not None:
            raise ParseFailure(self._failure)
        units: list[ParsedUnit] = []
        command = self._command_field
        scanner = self._scanner
        try:
            for event in scanner.feed(text):  # those before an error, if any
                if isinstance(event, Chunk):  # only the command field streams
                    if not event.is_string:
                        raise ParseFailure(f"the {command!r} argument must be a string")
                    self._seen_command = self._command_open = True
                    units += self._command_units(self._command.feed(event.text))
                elif isinstance(event, Field):
                    if event.key == command and command:
                        self._seen_command, self._command_open = True, False
                        units += self._command_units(self._command.finish())
                    elif not command:
                        units.append(self._unit(event.raw, event.key))
                elif isinstance(event, Element):
                    units.append(self._unit(event.raw, f"{event.key}[{event.index}]"))
            if scanner.failure is not None:
                self._command_failure()
                raise ParseFailure(scanner.failure)
        except ParseFailure as e:
            self._failure = str(e)  # raised by the next call; `units` go out now
        return units

    def _command_failure(self) -> None:
        """Raises the command parser's kept failure, if any: the text it was
        given comes before any error of the JSON around it."""
        if self._command_open:
            self._command_open = False
            self._command.feed("")

    def finish(self) -> list[ParsedUnit]:
        if self._failure is not None:
            raise ParseFailure(self._failure)
        try:
            try:
                self._scanner.finish()
            except ParseFailure:
                self._command_failure()
                raise
            if self._command_field and not self._seen_command:
                raise ParseFailure(f"the call has no {self._command_field!r} argument")
        except ParseFailure as e:
            self._failure = str(e)
            raise
        return []
