"""The scheduler's promises through the three services (tiny model, forced
decoding, real tools): the same results in both modes for every partial mode,
early abort that really stops decoding, retries, deadlines, many runs at once."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest
from conveyor.v1 import common_pb2, conveyor_pb2

from tests.conftest import descendant_pids
from tests.test_integration import (
    FILLER,
    call_outputs,
    collect,
    kinds,
    run_request,
    unit_results,
)

PARTIAL, SEQUENTIAL = conveyor_pb2.EXECUTION_MODE_PARTIAL, conveyor_pb2.EXECUTION_MODE_SEQUENTIAL


def tag(name: str, arguments: dict) -> str:
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


FLIGHT = {
    "origin": "JFK",
    "destination": "LHR",
    "departure_date": "2099-05-01",
    "return_date": "2099-05-09",
    "passengers": 2,
    "cabin": "economy",
    "passenger_names": ["Ada Lovelace", "Alan Turing"],
}

# One completion per partial mode; each runs in both modes.
CALLS = {
    "JSON_FIELDS (search)": tag("search", {"queries": ["json dumps", "sqlite"], "top_k": 2}),
    "JSON_FIELDS (validate)": tag("book_flight", FLIGHT),
    "SQL_STATEMENTS (database)": tag(
        "database",
        {"sql": "SELECT count(*) FROM modules;\nSELECT name FROM modules ORDER BY name LIMIT 2;"},
    ),
    "LINES (calculator)": tag("calculator", {"expression": "2**10\nsqrt(2) * 3\n1/0\n7 // 2"}),
    "PYTHON_STATEMENTS (python)": tag("python", {"code": "x = 21\nprint(x * 2)\nx + 1"}),
    "WHOLE (shout, from tests/tools.yaml)": tag("shout", {"text": "all at once"}),
}


def finished(events) -> conveyor_pb2.RunFinished:
    assert kinds(events)[-1] == "run_finished"
    return events[-1].run_finished


@pytest.mark.parametrize("mode_name", list(CALLS))
async def test_both_modes_give_the_same_results_for_every_partial_mode(stub, mode_name):
    completion = "Let me call the tool.\n" + CALLS[mode_name] + FILLER[:300]
    runs = {}
    for mode in (PARTIAL, SEQUENTIAL):
        events = await collect(stub, run_request([completion, "Done."], mode))
        assert finished(events).finish_reason == common_pb2.FINISH_REASON_FORCED_END
        runs[mode] = events
    assert unit_results(runs[PARTIAL]) == unit_results(runs[SEQUENTIAL])
    assert call_outputs(runs[PARTIAL]) == call_outputs(runs[SEQUENTIAL])
    assert unit_results(runs[PARTIAL]), "no unit ran"
    # Sequential mode holds a call's units until the call is complete, then
    # sends them together; partial mode sends the first one while the model
    # is still writing the call (tokens arrive between the dispatches).
    assert _tokens_between_dispatches(runs[SEQUENTIAL]) == 0
    if not mode_name.startswith("WHOLE"):  # a whole call is one unit, sent at its end
        assert _tokens_between_dispatches(runs[PARTIAL]) > 0


def _tokens_between_dispatches(events) -> int:
    at = [i for i, k in enumerate(kinds(events)) if k == "unit_dispatched"]
    return sum(k == "token_delta" for k in kinds(events)[at[0] : at[-1]])


async def test_an_invalid_argument_aborts_decoding_within_a_few_tokens(stub, worker):
    engine, _ = worker
    bad = {**FLIGHT, "origin": "XXQ"}
    long_tail = FILLER * 3  # thousands of tokens the model never has to write
    completion = tag("book_flight", bad) + long_tail
    events = await collect(stub, run_request([completion], PARTIAL))
    done = finished(events)
    assert done.finish_reason == common_pb2.FINISH_REASON_ABORTED
    assert "XXQ" in done.message and "origin" in done.message
    # Count the tokens decoded after the verdict reached the scheduler.
    verdict_at = kinds(events).index("abort_verdict")
    after = sum(
        e.token_delta.token_count for e in events[verdict_at:] if kinds([e]) == ["token_delta"]
    )
    total = engine.tokenizer(completion, add_special_tokens=False)["input_ids"]
    # The tiny model decodes a token in ~1 ms: 64 tokens is the verdict's trip
    # through gateway, scheduler and worker on a busy machine.
    assert after <= 64, f"{after} tokens were decoded after the verdict"
    assert done.timing.completion_tokens < len(total) // 10
    for _ in range(100):
        if engine.running == 0:
            break
        await asyncio.sleep(0.02)
    assert engine.running == 0, "the worker is still decoding the aborted run"


async def test_abort_retries_re_prompt_with_the_verdict(stub):
    bad = tag("book_flight", {**FLIGHT, "cabin": "hammock"})
    good = tag("book_flight", FLIGHT)
    request = run_request([bad + FILLER[:200], good, "Booked."], PARTIAL, abort_retries=1)
    events = await collect(stub, request)
    done = finished(events)
    assert done.finish_reason == common_pb2.FINISH_REASON_FORCED_END, done.message
    assert kinds(events).count("abort_verdict") == 1
    assert "parse_error" not in kinds(events)  # the cut-off call is not a parse error
    outputs = call_outputs(events)
    assert outputs["call-0"][1].startswith("aborted (argument 'cabin')")
    assert "all 7 arguments are valid" in outputs["call-1"][1]
    # Without retries the same first round ends the run.
    events = await collect(stub, run_request([bad + FILLER[:200], good], PARTIAL))
    assert finished(events).finish_reason == common_pb2.FINISH_REASON_ABORTED


async def test_a_deadline_stops_decoding_and_every_tool(stub, worker):
    engine, _ = worker
    before = descendant_pids()
    code = tag("python", {"code": "import time\ntime.sleep(30)\n"})
    request = run_request([code + FILLER * 4], PARTIAL)
    # Whichever timer fires first, ours or the client's, the status says so.
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        [e async for e in stub.Run(request, timeout=2.0)]
    assert failure.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    for _ in range(250):
        if engine.running == 0 and not (descendant_pids() - before):
            break
        await asyncio.sleep(0.02)
    assert engine.running == 0, "decoding went on past the deadline"
    assert not (descendant_pids() - before), "a tool process outlived the deadline"


async def test_32_concurrent_runs_with_mixed_tools_each_get_their_own_results(stub):
    def request(i: int) -> tuple[conveyor_pb2.RunRequest, str]:
        kind = i % 4
        if kind == 0:
            call, expect = tag("python", {"code": f"n = {i}\nprint(n * n)"}), f"{i * i}"
        elif kind == 1:
            call, expect = tag("calculator", {"expression": f"{i} * 3"}), f"{i * 3}"
        elif kind == 2:
            call = tag("database", {"sql": f"SELECT {i} + 1000;"})
            expect = f"{i + 1000}"
        else:
            call, expect = f"```python\nprint('run {i}')\n```\n", f"run {i}"
        return run_request([f"Run {i}:\n" + call + FILLER[:100], "ok"], PARTIAL), expect

    requests = [request(i) for i in range(32)]
    results = await asyncio.gather(*(collect(stub, r) for r, _ in requests))
    for i, ((_, expect), events) in enumerate(zip(requests, results, strict=True)):
        assert finished(events).finish_reason == common_pb2.FINISH_REASON_FORCED_END, i
        sequences = [e.sequence for e in events]
        assert sequences == list(range(len(events)))  # every event once, in order
        outputs = [text for _, text in call_outputs(events).values()]
        assert len(outputs) == 1 and expect in outputs[0], (i, outputs)


async def test_a_running_units_output_reaches_the_client_before_its_result(stub):
    code = "import time\nfor i in range(3):\n    print('tick', i)\n    time.sleep(0.3)\n"
    events = await collect(stub, run_request([tag("python", {"code": code}), "ok"], PARTIAL))
    progress = [e.unit_progress for e in events if kinds([e]) == ["unit_progress"]]
    assert progress and progress[0].progress.stdout.startswith("tick 0")
    first_progress = kinds(events).index("unit_progress")
    loop_result = next(
        i
        for i, e in enumerate(events)
        if kinds([e]) == ["unit_result"] and "tick 2" in e.unit_result.result.stdout
    )
    assert first_progress < loop_result
