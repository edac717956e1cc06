"""A run against a fake worker and a fake gateway (no gRPC, no model, no
sandbox): the order of sends against the model's deltas in each mode, tool
results read back in the next round, an abort verdict, and a client cancel.
The in-process integration tests (test_integration.py and others) cover the
same run through the real services."""

from __future__ import annotations

import asyncio

from conveyor_common.types import Envelope, FinishReason, Message, PartialMode
from scheduler.events import AbortVerdict, CallOutcome, RunFinished, UnitDispatched
from scheduler.run import Run, RunSpec
from scheduler.tools import ToolInfo
from scheduler.worker_client import WorkerDelta, WorkerDone

PYTHON = ToolInfo("python", partial_mode=PartialMode.PYTHON_STATEMENTS, partial_safe=True)
CODE = "```python\na = 1\nb = 2\n```\n"


class FakeWorker:
    """Streams each round's text a line at a time, logging what it does."""

    def __init__(self, log: list, rounds: list[str]):
        self.log, self.rounds, self.prompts, self.aborted = log, rounds, [], []

    async def generate(self, request_id, messages, tools, sampling, forced, timeout):
        self.prompts.append(list(messages))
        for line in self.rounds[len(self.prompts) - 1].splitlines(keepends=True):
            self.log.append(("delta", line))
            yield WorkerDelta(line, 1)
            await asyncio.sleep(0.005)  # the run (and the gateway) take each delta first
        yield WorkerDone(FinishReason.STOP, 1, 0.0, 0.0)

    async def abort(self, request_id: str) -> bool:
        self.aborted.append(request_id)
        return True


class FakeGateway:
    """Runs a call by joining its units; can answer a unit with a verdict."""

    def __init__(self, log: list, verdict_on: str = ""):
        self.log, self.verdict_on = log, verdict_on

    def stream(self, run_id, timeout, on_event, on_failure):
        return FakeStream(self, on_event)


class FakeStream:
    def __init__(self, gateway: FakeGateway, on_event):
        self._gateway, self._on_event = gateway, on_event
        self._units: dict[str, list[str]] = {}
        self._tasks: list[asyncio.Task] = []

    def _later(self, event) -> None:
        self._tasks.append(asyncio.ensure_future(self._on_event(event)))

    def open(self, call_id, tool, session_key):
        self._units[call_id] = []

    def unit(self, call_id, unit):
        self._gateway.log.append(("unit", unit.text))
        self._units[call_id].append(unit.text)
        if self._gateway.verdict_on and self._gateway.verdict_on in unit.text:
            self._later(AbortVerdict(call_id, f"no {self._gateway.verdict_on}"))

    def close_call(self, call_id, full_text, unit_count):
        self._gateway.log.append(("close", call_id))
        output = "".join(self._units[call_id]).strip()
        self._later(CallOutcome(call_id, True, output=output, units_executed=unit_count))

    def cancel_call(self, call_id, reason):
        self._gateway.log.append(("cancel", call_id))

    async def finish(self, wait):
        await asyncio.gather(*self._tasks)

    def cancel(self):
        pass


def run_of(rounds: list[str], partial: bool = True, verdict_on: str = ""):
    log: list = []
    worker, gateway = FakeWorker(log, rounds), FakeGateway(log, verdict_on)
    spec = RunSpec(
        run_id="r",
        messages=[Message("user", "go")],
        tools={"python": PYTHON},
        partial=partial,
        envelopes=frozenset({Envelope.FENCE}),
        timeout=30,
    )
    return Run(spec, worker, gateway), worker, log


async def events_of(run: Run) -> list:
    return [e async for e in run.events()]


async def test_partial_mode_sends_each_unit_before_the_next_line_is_decoded():
    run, _, log = run_of([CODE, "done"])
    await events_of(run)
    sends = [entry for entry in log if entry[0] != "close"][:5]
    assert sends == [
        ("delta", "```python\n"),
        ("delta", "a = 1\n"),
        ("unit", "a = 1\n"),
        ("delta", "b = 2\n"),
        ("unit", "b = 2\n"),
    ]


async def test_sequential_mode_holds_the_units_until_the_call_is_complete():
    run, _, log = run_of([CODE + "and more text\n", "done"], partial=False)
    events = await events_of(run)
    first_unit = log.index(("unit", "a = 1\n"))
    assert log.index(("delta", "```\n")) < first_unit  # the closing fence came first
    assert first_unit < log.index(("delta", "and more text\n"))  # but still while decoding
    dispatched = [e for e in events if isinstance(e, UnitDispatched)]
    assert [d.during_decode for d in dispatched] == [True, True]


async def test_tool_results_are_read_back_in_the_next_round():
    run, worker, _ = run_of([CODE, "the answer"])
    events = await events_of(run)
    finished = events[-1]
    assert isinstance(finished, RunFinished) and finished.finish_reason is FinishReason.STOP
    assert finished.final_text == "the answer"
    round_two = worker.prompts[1]
    assert [m.role for m in round_two] == ["user", "assistant", "tool"]
    assert round_two[2].content == "a = 1\nb = 2"


async def test_an_abort_verdict_stops_decoding_and_ends_the_run():
    run, worker, log = run_of([CODE + "more\n" * 50, "unused"], verdict_on="a = 1")
    events = await events_of(run)
    assert events[-1].finish_reason is FinishReason.ABORTED
    assert worker.aborted == ["r-r0"]
    assert ("unit", "b = 2\n") not in log  # decoding stopped before the next statement
    assert len(worker.prompts) == 1


async def test_a_client_cancel_ends_the_run_as_cancelled():
    run, _, _ = run_of([CODE, "done"])
    events = run.events()
    await anext(events)  # RoundStarted
    await events.aclose()
    assert run._counted  # its end is counted and logged once
