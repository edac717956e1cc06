"""LLMCompiler-style plans through the three services: steps run as soon as
they and the steps they name are complete, `$n` is bound to step n's result,
independent steps run in parallel, and both modes give the same results."""

from __future__ import annotations

import time

import pytest
from conveyor.v1 import common_pb2, conveyor_pb2

from scheduler.parsers import ParseFailure
from scheduler.plans import BoundStep, arguments_for, bind
from scheduler.tools import ToolInfo
from tests.test_integration import (
    FILLER,
    call_outputs,
    collect,
    kinds,
    run_request,
)

PLAN = (
    "Thought: compute, look it up, then combine.\n"
    '$1 = python("import time\\nshared = 1\\ntime.sleep(0.3)\\nprint(6 * 7)")\n'
    "$2 = python(\"print('shared' in globals())\")\n"
    '$3 = search("json dumps indent")\n'
    "$4 = python(\"print(int('$1') + 1)\")\n"
    "$5 = join()\n"
    "<END_OF_PLAN>\n"
)


def plan_request(mode: int, plan: str = PLAN) -> conveyor_pb2.RunRequest:
    return run_request([plan + FILLER[:600], "Done."], mode, envelopes=[conveyor_pb2.ENVELOPE_PLAN])


def test_bind_replaces_step_references():
    assert bind('calculator("$1 + ${2}")', {1: "3", 2: "4"}) == BoundStep(
        "calculator", ["3 + 4"], {}
    )
    assert bind("python($1, [$2, 'k'], n=3)", {1: "a", 2: "b"}) == BoundStep(
        "python", ["a", ["b", "k"]], {"n": 3}
    )
    with pytest.raises(ParseFailure, match="not a literal"):
        bind("python(open('x'))", {})
    with pytest.raises(ParseFailure, match="step number"):
        bind("python($x)", {})


def test_arguments_follow_the_tool_schema():
    search = ToolInfo(
        "search",
        parameters={"properties": {"queries": {"type": "array"}, "top_k": {"type": "integer"}}},
    )
    assert arguments_for(search, BoundStep("search", ["a"], {"top_k": 2})) == (
        '{"queries": ["a"], "top_k": 2}'
    )
    with pytest.raises(ParseFailure, match="takes 2 argument"):
        arguments_for(search, BoundStep("search", ["a", 1, 2], {}))


async def test_a_plan_runs_its_steps_with_their_dependencies(stub):
    started = time.perf_counter()
    events = await collect(stub, plan_request(conveyor_pb2.EXECUTION_MODE_PARTIAL))
    elapsed = time.perf_counter() - started
    finished = events[-1].run_finished
    assert finished.finish_reason == common_pb2.FINISH_REASON_FORCED_END, finished.message
    outputs = call_outputs(events)
    assert outputs["call-0.1"] == (True, "42")
    # Each step has a session of its own (so independent steps of one tool
    # run in parallel, test_gateway checks that): $2 does not see $1's names.
    assert outputs["call-0.2"] == (True, "False")
    assert outputs["call-0.3"][0] and "json.dumps" in outputs["call-0.3"][1]
    assert outputs["call-0.4"] == (True, "43")  # $1 bound into its code
    plan_ok, summary = outputs["call-0"]
    assert plan_ok and "$4 = python" in summary and "→ 43" in summary
    dispatched = [e.unit_dispatched for e in events if kinds([e]) == ["unit_dispatched"]]
    plan_steps = [d for d in dispatched if d.call_id == "call-0"]
    assert [d.field for d in plan_steps] == ["1", "2", "3", "4", "5"]
    assert list(plan_steps[3].depends_on) == [1]
    # The first steps ran while the model was still writing the plan.
    assert plan_steps[0].during_decode
    assert elapsed < 60


async def test_both_modes_give_the_same_plan_results(stub):
    partial = await collect(stub, plan_request(conveyor_pb2.EXECUTION_MODE_PARTIAL))
    sequential = await collect(stub, plan_request(conveyor_pb2.EXECUTION_MODE_SEQUENTIAL))
    assert call_outputs(partial) == call_outputs(sequential)
    seq_dispatched = [e.unit_dispatched for e in sequential if kinds([e]) == ["unit_dispatched"]]
    assert not any(d.during_decode for d in seq_dispatched if d.call_id == "call-0")


async def test_a_failed_step_fails_the_steps_that_need_it(stub):
    plan = (
        '$1 = python("1 / 0")\n'
        "$2 = python(\"print('$1')\")\n"
        '$3 = nosuchtool("x")\n'
        "$4 = python(\"print('independent')\")\n"
    )
    events = await collect(stub, plan_request(conveyor_pb2.EXECUTION_MODE_PARTIAL, plan))
    outputs = call_outputs(events)
    assert not outputs["call-0.1"][0] and "ZeroDivisionError" in outputs["call-0.1"][1]
    assert "call-0.2" not in outputs and "call-0.3" not in outputs  # never started
    assert outputs["call-0.4"] == (True, "independent")
    plan_ok, summary = outputs["call-0"]
    assert not plan_ok
    assert "needs $1, which failed" in summary and "unknown tool 'nosuchtool'" in summary
