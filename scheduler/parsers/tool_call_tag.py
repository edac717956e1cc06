"""The JSON inside `<tool_call>…</tool_call>`: `{"name": …, "arguments": …}`.

The tool's name is known as soon as its string closes; from then on the
arguments stream into the tool's own parser (`arguments_parser_for(name)`),
so a python call's first statement runs while the rest of its JSON-encoded
code is still being decoded. Arguments written before the name are held and
replayed once the name arrives. `arguments` may be an object or, as OpenAI
writes it, a JSON-encoded string of one.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from scheduler.parsers.base import ParsedUnit, ParseFailure, UnitParser
from scheduler.parsers.json_stream import Chunk, Field, JsonObjectScanner


class ToolCallTagParser:
    def __init__(self, arguments_parser_for: Callable[[str], UnitParser]):
        """`arguments_parser_for(name)` returns the parser for that tool's
        arguments, or raises ParseFailure for an unknown tool."""
        self._parser_for = arguments_parser_for
        self._scanner = JsonObjectScanner(stream_keys=frozenset({"arguments"}), elements=False)
        self._arguments: UnitParser | None = None
        self._held: list[str] = []  # arguments text seen before the name
        self._text: list[str] = []  # the arguments text, for the call's full text
        self._arguments_done = False
        self.name = ""

    @property
    def arguments_text(self) -> str:
        return "".join(self._text)

    def feed(self, text: str) -> list[ParsedUnit]:
        units: list[ParsedUnit] = []
        for event in self._scanner.feed(text):
            if isinstance(event, Chunk):
                self._text.append(event.text)
                if self._arguments is None:
                    self._held.append(event.text)
                else:
                    units += self._arguments.feed(event.text)
            elif isinstance(event, Field) and event.key == "name":
                units += self._named(event.raw)
            elif isinstance(event, Field) and event.key == "arguments":
                self._arguments_done = True
                if self._arguments is not None:
                    units += self._arguments.finish()
        return units

    def _named(self, raw: str) -> list[ParsedUnit]:
        name = json.loads(raw)
        if not isinstance(name, str) or not name:
            raise ParseFailure('the tool call\'s "name" must be a non-empty string')
        if self.name:
            raise ParseFailure('the tool call has two "name" fields')
        self.name = name
        self._arguments = self._parser_for(name)
        units: list[ParsedUnit] = []
        for piece in self._held:
            units += self._arguments.feed(piece)
        self._held = []
        if self._arguments_done:
            units += self._arguments.finish()
        return units

    def finish(self) -> list[ParsedUnit]:
        self._scanner.finish()
        if not self.name:
            raise ParseFailure('the tool call has no "name"')
        if self._arguments_done:
            return []
        self._text.append("{}")  # no arguments: an empty object
        return self._arguments.feed("{}") + self._arguments.finish()
