"""Every registered tool-call format through the three services, with
forced decoding: a python call written in the format runs its first
statement while the model is still decoding, gives the same tool results in
PARTIAL and SEQUENTIAL mode, and a call cut off by the end of the output is a
clear ParseError while the run still finishes. The calls are the benchmark's
(bench/parsers/formats.py), so the two cannot drift apart."""

from __future__ import annotations

import pytest
from conveyor.v1 import common_pb2, conveyor_pb2

from bench.parsers.formats import RENDER, available
from conveyor_common.types import Envelope
from scheduler.servicer import _ENVELOPES
from tests.test_integration import (
    FILLER,
    collect,
    run_request,
    unit_results,
)

CODE = "import json\nvalues = [3, 4]\nprint(json.dumps(sum(values)))\n"
BY_NAME = {envelope.value: value for value, envelope in _ENVELOPES.items()}


def request(name: str, completion: str, mode: int) -> conveyor_pb2.RunRequest:
    return run_request([completion, "done"], mode, envelopes=[BY_NAME[name]])


def kinds(events) -> list[str]:
    return [e.WhichOneof("event") for e in events]


@pytest.mark.parametrize("name", available())
async def test_a_call_in_the_format_runs_partially_and_like_sequential(stub, name):
    completion = RENDER[name](CODE) + "\n" + FILLER
    results = {}
    for mode in (conveyor_pb2.EXECUTION_MODE_PARTIAL, conveyor_pb2.EXECUTION_MODE_SEQUENTIAL):
        events = await collect(stub, request(name, completion, mode))
        assert events[-1].run_finished.finish_reason == common_pb2.FINISH_REASON_FORCED_END
        dispatched = [
            e.unit_dispatched for e in events if e.WhichOneof("event") == "unit_dispatched"
        ]
        assert [d.text for d in dispatched] == CODE.splitlines(keepends=True), name
        if mode == conveyor_pb2.EXECUTION_MODE_PARTIAL:
            assert dispatched[0].during_decode  # while the filler is still being decoded
        results[mode] = unit_results(events)
        assert "parse_error" not in kinds(events)
    partial, sequential = results.values()
    assert partial == sequential
    assert any(stdout == "7\n" for _, stdout, _, _ in partial.values())


@pytest.mark.parametrize("name", available())
async def test_a_call_cut_off_by_the_end_of_output_is_a_parse_error(stub, name):
    if name == Envelope.FENCE:
        pytest.skip("a fence cut off at the end of the output is a complete block")
    whole = RENDER[name](CODE)
    cut = whole[: whole.index("print(") + 3]  # inside the last statement's argument
    events = await collect(stub, request(name, cut, conveyor_pb2.EXECUTION_MODE_PARTIAL))
    errors = [e.parse_error.message for e in events if e.WhichOneof("event") == "parse_error"]
    assert len(errors) == 1 and errors[0], (name, kinds(events))
    assert events[-1].WhichOneof("event") == "run_finished"
