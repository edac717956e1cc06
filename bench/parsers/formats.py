"""The tool-call formats as benchmark rows: a python call whose `code` is
real standard-library source, written in each format, fed through what the
scheduler runs per delta for it — the envelope scanner, then the call's own
parser (the arguments' `code` streamed into the Python statement parser)."""

from __future__ import annotations

import json

from conveyor_common.types import PartialMode
from scheduler.envelopes import (
    FORMATS,
    CallBody,
    CallClosed,
    CallOpened,
    EnvelopeScanner,
    ScanContext,
    formats_named,
)
from scheduler.parsers import (
    ParsedUnit,
    ToolCallTagParser,
    UnitParser,
    arguments_parser_for,
    parser_for,
)

PYTHON = PartialMode.PYTHON_STATEMENTS


def _args(code: str) -> str:
    return json.dumps({"code": code})


# Each format's python call around `code`, as the format's models write it.
RENDER = {
    "fence": lambda code: f"Here it is:\n```python\n{code}```\n",
    "tag": lambda code: f'<tool_call>{{"name": "python", "arguments": {_args(code)}}}</tool_call>',
    "llama3_json": lambda code: f'<|python_tag|>{{"name": "python", "parameters": {_args(code)}}}',
    "pythonic": lambda code: f"[python(code={code!r})]",
    "mistral": lambda code: f'[TOOL_CALLS][{{"name": "python", "arguments": {_args(code)}}}]',
    "qwen3_coder": lambda code: (
        "<tool_call>\n<function=python>\n<parameter=code>\n"
        f"{code}\n</parameter>\n</function>\n</tool_call>"
    ),
    "deepseek": lambda code: (
        "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>python\n"
        f"```json\n{_args(code)}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>"
    ),
    "harmony": lambda code: (
        "<|channel|>commentary to=functions.python <|constrain|>json<|message|>"
        f"{_args(code)}<|call|>"
    ),
}


def available() -> list[str]:
    """The formats this scheduler has, that the bench can write."""
    return [name for name in RENDER if name in FORMATS]


class FormatPipeline:
    """A UnitParser over a format's whole output: scanner, then call parser."""

    def __init__(self, name: str):
        self._scanner = EnvelopeScanner(
            formats_named([name]), ScanContext(fence_tools={"python": "python"})
        )
        self._parser: UnitParser | None = None

    def feed(self, text: str) -> list[ParsedUnit]:
        units: list[ParsedUnit] = []
        for event in self._scanner.feed(text):
            units += self._on(event)
        return units

    def finish(self) -> list[ParsedUnit]:
        units: list[ParsedUnit] = []
        for event in self._scanner.finish():
            units += self._on(event)
        return units

    def _on(self, event) -> list[ParsedUnit]:
        if isinstance(event, CallOpened):
            if event.body is CallBody.COMMAND:
                self._parser = parser_for(PYTHON)
            elif event.body is CallBody.CALL_JSON:
                self._parser = ToolCallTagParser(lambda name: arguments_parser_for(PYTHON, "code"))
            else:
                self._parser = arguments_parser_for(PYTHON, "code")
            return []
        if isinstance(event, CallClosed):
            return self._parser.finish()
        return self._parser.feed(event.text)
