"""PARTIAL_MODE_JSON_FIELDS: a unit per complete top-level field of the
arguments object, and one per complete element of an array field (emitted
before the field itself, field name "name[i]").

With a `command_field` ("code" for the python tool) the parser instead streams
that field's string, decoded character by character, into the command's own
parser (Python statements, say) and emits only the command's units: the first
statement runs while the JSON string that holds the rest is still arriving.
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
        self._scanner = JsonObjectScanner(
            stream_keys=frozenset({command_field}) if command_field else frozenset(),
            elements=not command_field,
        )
        self._index = 0

    def _unit(self, text: str, field: str) -> ParsedUnit:
        unit = ParsedUnit(self._index, text, field)
        self._index += 1
        return unit

    def _command_units(self, units: list[ParsedUnit]) -> list[ParsedUnit]:
        return [self._unit(u.text, self._command_field) for u in units]

    def feed(self, text: str) -> list[ParsedUnit]:
        units: list[ParsedUnit] = []
        command = self._command_field
        for event in self._scanner.feed(text):
            if isinstance(event, Chunk):  # only the command field streams
                if not event.is_string:
                    raise ParseFailure(f"the {command!r} argument must be a string")
                self._seen_command = True
                units += self._command_units(self._command.feed(event.text))
            elif isinstance(event, Field):
                if event.key == command and command:
                    self._seen_command = True
                    units += self._command_units(self._command.finish())
                elif not command:
                    units.append(self._unit(event.raw, event.key))
            elif isinstance(event, Element):
                units.append(self._unit(event.raw, f"{event.key}[{event.index}]"))
        return units

    def finish(self) -> list[ParsedUnit]:
        self._scanner.finish()
        if self._command_field and not self._seen_command:
            raise ParseFailure(f"the call has no {self._command_field!r} argument")
        return []
