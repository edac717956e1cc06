"""The JSON inside `<tool_call>…</tool_call>`: `{"name": …, "arguments": …}`,
or with `"parameters"` for `"arguments"` (as Llama-style templates write it),
or in OpenAI's nesting `{"type": "function", "function": {"name": …, …}}`.

The tool's name is known as soon as its string closes; from then on the
arguments stream into the tool's own parser (`arguments_parser_for(name)`),
so a python call's first statement runs while the rest of its JSON-encoded
code is still being decoded. Arguments written before the name are held and
replayed once the name arrives. `arguments` may be an object or, as OpenAI
writes it, a JSON-encoded string of one.

Malformed JSON (a raw control character in any string, "name" or "arguments"
twice, arguments nested deeper than `json_stream.MAX_DEPTH`), an unknown tool
or bad arguments are a ParseFailure, deferred as UnitParser says: the units
before the error are handed out first, for any split.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from scheduler.parsers.base import ParsedUnit, ParseFailure, UnitParser
from scheduler.parsers.json_stream import MAX_DEPTH, Chunk, Field, JsonObjectScanner

# Either names the arguments object; "function" holds a whole call (OpenAI).
ARGUMENT_KEYS = frozenset({"arguments", "parameters"})
_STREAMED = ARGUMENT_KEYS | {"function"}


class ToolCallTagParser:
    def __init__(self, arguments_parser_for: Callable[[str], UnitParser]):
        """`arguments_parser_for(name)` returns the parser for that tool's
        arguments, or raises ParseFailure for an unknown tool."""
        self._parser_for = arguments_parser_for
        # The arguments sit one level down: they may nest as deep as on their own.
        self._scanner = JsonObjectScanner(
            stream_keys=_STREAMED, elements=False, max_depth=MAX_DEPTH, outer=1
        )
        self._arguments_key = ""  # "arguments" or "parameters", whichever came
        self._nested: ToolCallTagParser | None = None  # OpenAI's {"function": {...}}
        self._arguments: UnitParser | None = None
        self._held: list[str] = []  # arguments text seen before the name
        self._text: list[str] = []  # the arguments text, for the call's full text
        self._arguments_done = False
        self._failure: str | None = None  # kept: the next feed() or finish() raises it
        self.name = ""

    @property
    def arguments_text(self) -> str:
        if self._nested is not None:
            return self._nested.arguments_text
        return "".join(self._text)

    def feed(self, text: str) -> list[ParsedUnit]:
        if self._failure is not None:
            raise ParseFailure(self._failure)
        units: list[ParsedUnit] = []
        scanner = self._scanner
        try:
            for event in scanner.feed(text):  # those before an error, if any
                if getattr(event, "key", "") == "function":
                    units += self._function(event)
                elif isinstance(event, Chunk):
                    self._arguments_from(event.key)
                    self._text.append(event.text)
                    if self._arguments is None:
                        self._held.append(event.text)
                    else:
                        units += self._arguments.feed(event.text)
                elif isinstance(event, Field) and event.key == "name":
                    self._named(event.raw, units)
                elif isinstance(event, Field) and event.key in ARGUMENT_KEYS:
                    self._arguments_from(event.key)
                    self._arguments_done = True
                    if self._arguments is not None:
                        units += self._arguments.finish()
            if scanner.failure is not None:
                self._arguments_failure()
                raise ParseFailure(scanner.failure)
        except ParseFailure as e:
            self._failure = str(e)  # raised by the next call; `units` go out now
        return units

    def _arguments_from(self, key: str) -> None:
        if self._arguments_key and key != self._arguments_key:
            raise ParseFailure('the tool call has both "arguments" and "parameters"')
        if self._nested is not None:
            raise ParseFailure('the tool call has both "function" and its own fields')
        self._arguments_key = key

    def _function(self, event) -> list[ParsedUnit]:
        """OpenAI's nesting: the call object is the "function" field's value."""
        if self.name or self._arguments_key:
            raise ParseFailure('the tool call has both "function" and its own fields')
        if self._nested is None:
            self._nested = ToolCallTagParser(self._parser_for)
        if isinstance(event, Chunk):
            return self._nested.feed(event.text)
        return []  # the Field that ends it: its finish comes with ours

    def _arguments_failure(self) -> None:
        """Raises the arguments parser's kept failure, if any: the text it was
        given comes before any error of the JSON around it."""
        if self._arguments is not None and not self._arguments_done:
            self._arguments_done = True
            self._arguments.feed("")

    def _named(self, raw: str, units: list[ParsedUnit]) -> None:
        try:
            name = json.loads(raw)  # valid JSON: the scanner let it through
        except (ValueError, RecursionError):
            name = None
        if not isinstance(name, str) or not name:
            raise ParseFailure('the tool call\'s "name" must be a non-empty string')
        self.name = name
        self._arguments = self._parser_for(name)
        held, self._held = self._held, []
        for piece in held:
            units += self._arguments.feed(piece)
        if self._arguments_done:
            units += self._arguments.finish()

    def finish(self) -> list[ParsedUnit]:
        if self._failure is not None:
            raise ParseFailure(self._failure)
        try:
            return self._finish()
        except ParseFailure as e:
            self._failure = str(e)
            raise

    def _finish(self) -> list[ParsedUnit]:
        try:
            self._scanner.finish()
        except ParseFailure:
            self._arguments_failure()
            raise
        if self._nested is not None:
            return self._nested.finish()
        if not self.name:
            raise ParseFailure('the tool call has no "name"')
        if self._arguments_done:
            return []
        self._text.append("{}")  # no arguments: an empty object
        return self._arguments.feed("{}") + self._arguments.finish()
