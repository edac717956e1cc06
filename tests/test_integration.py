"""All three services in-process on port 0, the tiny model under forced
decoding, real sandboxed Python: both modes, event order, cancel."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from conveyor.v1 import common_pb2, conveyor_pb2

from tests.conftest import descendant_pids

# Filler decoded after the code, so generation goes on long after the first
# statement is complete (the tiny model decodes ~1 ms a token).
FILLER = " and then some more words of explanation" * 150

PROGRAM = (
    "Here is the code:\n"
    "```python\n"
    "import json\n"
    "data = [i * i for i in range(10)]\n"
    "total = sum(data)\n"
    "def describe(values):\n"
    "    return json.dumps({'n': len(values), 'max': max(values)})\n"
    "print(total)\n"
    "describe(data)\n"
    "1 / 0\n"
    "print('after the error')\n"
    "```\n"
)


def run_request(completions: list[str], mode: int, **kw) -> conveyor_pb2.RunRequest:
    return conveyor_pb2.RunRequest(
        messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="Compute things.")],
        mode=mode,
        forced_completions=completions,
        max_rounds=len(completions),
        **kw,
    )


async def collect(stub, request) -> list[conveyor_pb2.RunResponse]:
    return [r async for r in stub.Run(request, timeout=120)]


def kinds(events):
    return [e.WhichOneof("event") for e in events]


def call_outputs(events) -> dict[str, tuple[bool, str]]:
    """Each finished call's (ok, output); a failed call's output is its error."""
    out = {}
    for e in events:
        if e.WhichOneof("event") == "tool_call_finished":
            f = e.tool_call_finished
            if f.WhichOneof("outcome") == "result":
                out[f.call_id] = (f.result.ok, f.result.output)
            else:
                out[f.call_id] = (False, f.error.message)
    return out


def unit_results(events):
    """Tool results without timing, keyed by (call, index)."""
    out = {}
    for e in events:
        if e.WhichOneof("event") == "unit_result":
            r = e.unit_result.result
            out[(e.unit_result.call_id, r.index)] = (r.ok, r.stdout, r.value, r.exception)
    return out


async def test_both_modes_give_the_same_tool_results(stub):
    completions = [PROGRAM + FILLER[:200], "The total was printed above."]
    partial = await collect(stub, run_request(completions, conveyor_pb2.EXECUTION_MODE_PARTIAL))
    sequential = await collect(
        stub, run_request(completions, conveyor_pb2.EXECUTION_MODE_SEQUENTIAL)
    )

    assert unit_results(partial) == unit_results(sequential)
    results = unit_results(partial)
    assert len(results) == 8
    assert results[("call-0", 4)] == (True, "285\n", "", "")
    assert results[("call-0", 5)][2] == '\'{"n": 10, "max": 81}\''
    assert not results[("call-0", 6)][0] and "ZeroDivisionError" in results[("call-0", 6)][3]
    assert results[("call-0", 7)][:2] == (True, "after the error\n")
    for events in (partial, sequential):
        assert [e.sequence for e in events] == list(range(len(events)))
        assert kinds(events)[-1] == "run_finished"
        finished = events[-1].run_finished
        assert finished.finish_reason == common_pb2.FINISH_REASON_FORCED_END
        assert finished.final_text == completions[1]
        assert finished.timing.rounds == 2 and finished.timing.units_dispatched == 8
        # The model saw the tool's output in round 1 (rounds really happen).
        assert kinds(events).count("round_started") == 2


async def test_partial_mode_runs_the_first_unit_before_generation_ends(stub):
    completion = PROGRAM + FILLER
    events = await collect(stub, run_request([completion], conveyor_pb2.EXECUTION_MODE_PARTIAL))
    order = kinds(events)
    first_result = order.index("unit_result")
    last_token = len(order) - 1 - order[::-1].index("token_delta")
    assert first_result < last_token, "the first unit's result came only after decoding ended"
    dispatched = [e.unit_dispatched for e in events if e.WhichOneof("event") == "unit_dispatched"]
    assert all(d.during_decode for d in dispatched[:-1])
    timing = events[-1].run_finished.timing
    assert timing.hidden_tool_seconds > 0

    sequential = await collect(
        stub, run_request([completion], conveyor_pb2.EXECUTION_MODE_SEQUENTIAL)
    )
    # In sequential mode nothing is sent before the call's closing fence.
    order = kinds(sequential)
    texts = "".join(
        e.token_delta.text
        for e in sequential[: order.index("unit_dispatched")]
        if e.WhichOneof("event") == "token_delta"
    )
    assert "```" in texts.split("```python\n", 1)[1]


async def test_tool_call_tags_stream_their_code_and_bad_calls_are_parse_errors(stub):
    completion = (
        '<tool_call>{"name": "python", "arguments": {"code": "x = 40\\nx + 2\\n'
        + "# padding " * 40
        + '"}}</tool_call>\n'
        '<tool_call>{"name": "nope", "arguments": {}}</tool_call>\n'
        "<tool_call>{not json</tool_call>\n"
        "```python\nok = 1\nprint(ok\nnever = 2\n```\n"
        '<tool_call>{"name": "python", "arguments": {"code": "x * 2"}}</tool_call>'
    )
    events = await collect(
        stub, run_request([completion, "done"], conveyor_pb2.EXECUTION_MODE_PARTIAL)
    )
    results = unit_results(events)
    assert results[("call-0", 1)][2] == "42"
    # The tag's first statements ran while the rest of its JSON string was decoded.
    first = next(e.unit_dispatched for e in events if e.WhichOneof("event") == "unit_dispatched")
    assert first.call_id == "call-0" and first.during_decode
    errors = {
        e.parse_error.call_id: e.parse_error.message
        for e in events
        if e.WhichOneof("event") == "parse_error"
    }
    assert "unknown tool 'nope'" in errors["call-1"] and "python" in errors["call-1"]
    assert "malformed JSON" in errors["call-2"] and "expected a key" in errors["call-2"]
    assert "Python syntax error" in errors["call-3"] and "print(ok" in errors["call-3"]
    assert results[("call-3", 0)][0]  # the statement before the error ran
    assert results[("call-4", 0)][2] == "80"  # the run went on
    finished = events[-1].run_finished
    assert finished.finish_reason == common_pb2.FINISH_REASON_FORCED_END


async def test_variables_persist_across_calls_and_rounds(stub):
    completions = ["```python\ncounter = 41\n```\n", "```python\ncounter + 1\n```\n", "ok"]
    events = await collect(stub, run_request(completions, conveyor_pb2.EXECUTION_MODE_PARTIAL))
    assert unit_results(events)[("call-1", 0)][2] == "42"


async def test_cancel_stops_generation_and_kills_the_interpreter(stub, worker):
    engine, _ = worker
    before = descendant_pids()
    completion = "```python\nimport time\ntime.sleep(60)\nprint('never')\n```\n" + FILLER * 4
    call = stub.Run(run_request([completion], conveyor_pb2.EXECUTION_MODE_PARTIAL), timeout=120)
    async for response in call:
        if (
            response.WhichOneof("event") == "unit_dispatched"
            and response.unit_dispatched.index == 1
        ):
            break
    await asyncio.sleep(0.5)  # let the sleep start inside the sandbox
    assert engine.running == 1
    assert descendant_pids() - before, "no interpreter process was started"
    call.cancel()
    for _ in range(100):
        if engine.running == 0 and not (descendant_pids() - before):
            break
        await asyncio.sleep(0.1)
    assert engine.running == 0, "the worker is still generating"
    assert not (descendant_pids() - before), "tool processes were left behind"


async def test_bad_requests_get_clear_statuses(stub):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(stub, conveyor_pb2.RunRequest())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(
            stub, run_request(["x"], conveyor_pb2.EXECUTION_MODE_PARTIAL, tool_names=["nope"])
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "nope" in err.value.details()
