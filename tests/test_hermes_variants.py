"""The Hermes tag as models really fill it: "parameters" for "arguments",
OpenAI's {"type": "function", "function": {...}} nesting, and a JSON list of
calls in one tag; each streams its code into the python tool's statements,
in both modes, through the three services."""

from __future__ import annotations

import json

import pytest
from conveyor.v1 import conveyor_pb2

from conveyor_common.types import PartialMode
from scheduler.parsers import ParseFailure, ToolCallTagParser, arguments_parser_for
from tests.test_integration import (
    FILLER,
    call_outputs,
    collect,
    run_request,
    unit_results,
)

CODE = "a = 6\nb = 7\nprint(a * b)\n"


def parse(text: str) -> tuple[list[str], str]:
    """Units and arguments text, fed one character at a time; or the failure."""
    parser = ToolCallTagParser(
        lambda name: arguments_parser_for(PartialMode.PYTHON_STATEMENTS, "code")
    )
    units = []
    try:
        for ch in text:
            units += parser.feed(ch)
        units += parser.finish()
    except ParseFailure as e:
        return [u.text for u in units], f"failure: {e}"
    return [u.text for u in units], parser.arguments_text


ARGS = json.dumps({"code": CODE})
SUM_ARGS = json.dumps({"code": "print(a + b)\n"})


@pytest.mark.parametrize(
    "call",
    [
        f'{{"name": "python", "parameters": {ARGS}}}',
        f'{{"type": "function", "function": {{"name": "python", "arguments": {ARGS}}}}}',
        f'{{"function": {{"arguments": {json.dumps(ARGS)}, "name": "python"}}}}',
    ],
)
def test_each_variant_streams_the_code_statement_by_statement(call):
    units, arguments = parse(call)
    assert units == ["a = 6\n", "b = 7\n", "print(a * b)\n"]
    assert json.loads(arguments if arguments.startswith("{") else json.loads(arguments)) == {
        "code": CODE
    }


def test_arguments_and_parameters_together_are_a_parse_failure():
    _, result = parse(f'{{"name": "python", "arguments": {ARGS}, "parameters": {{}}}}')
    assert result.startswith("failure") and "parameters" in result


def test_function_beside_the_calls_own_fields_is_a_parse_failure():
    _, result = parse('{"name": "python", "function": {"name": "python"}}')
    assert result.startswith("failure") and "function" in result


def _tag(call: str) -> str:
    return f"<tool_call>{call}</tool_call>"


COMPLETIONS = {
    "parameters": _tag(f'{{"name": "python", "parameters": {ARGS}}}'),
    "openai": _tag(
        f'{{"type": "function", "function": {{"name": "python", "arguments": {ARGS}}}}}'
    ),
    "list": _tag(
        f'[{{"name": "python", "arguments": {ARGS}}}, '
        f'{{"name": "python", "arguments": {SUM_ARGS}}}]'
    ),
}


@pytest.mark.parametrize("variant", sorted(COMPLETIONS))
async def test_variants_run_partially_with_the_same_results_as_sequentially(stub, variant):
    completion = COMPLETIONS[variant] + FILLER
    results = {}
    for mode in (conveyor_pb2.EXECUTION_MODE_PARTIAL, conveyor_pb2.EXECUTION_MODE_SEQUENTIAL):
        request = run_request(
            [completion, "done"], mode, envelopes=[conveyor_pb2.ENVELOPE_TOOL_CALL_TAG]
        )
        events = await collect(stub, request)
        dispatched = [
            e.unit_dispatched for e in events if e.WhichOneof("event") == "unit_dispatched"
        ]
        if mode == conveyor_pb2.EXECUTION_MODE_PARTIAL:
            assert dispatched and dispatched[0].during_decode
        results[mode] = unit_results(events)
        outputs = sorted(out for _, out in call_outputs(events).values())
        assert outputs == (["13", "42"] if variant == "list" else ["42"]), outputs
    assert (
        results[conveyor_pb2.EXECUTION_MODE_PARTIAL]
        == results[conveyor_pb2.EXECUTION_MODE_SEQUENTIAL]
    )
