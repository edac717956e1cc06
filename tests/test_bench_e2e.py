"""The end-to-end benchmark: its requests come from real data, its ideal
bound is computed right, and its quick path runs the three services and
reports every workload (structure only: speed lives in bench/)."""

from __future__ import annotations

import json

import pytest
from conveyor.v1 import common_pb2, conveyor_pb2

from bench.e2e import workloads
from bench.e2e.timeline import RunTimeline, Stamped


def test_every_workload_builds_distinct_requests_from_real_data():
    for name in workloads.WORKLOADS:
        requests = workloads.build(name, 10)
        assert len(requests) == 10 and len({r.name for r in requests}) == 10, name
        assert all(r.completions and r.completions[0] for r in requests)
        assert len({r.completions[0] for r in requests}) == 10, f"{name} repeats itself"
    code = workloads.build("code", 4)
    assert any(r.name.startswith("HumanEval/") for r in code)
    assert any("import torch" in r.completions[0] for r in code)
    flights = workloads.build("validation", 10)
    assert sum(r.expect_abort for r in flights) == 4 and flights[0].expect_abort
    assert all(len(r.completions) == 1 for r in flights if r.expect_abort)
    assert all(r.plan for r in workloads.build("planning", 2))


def _event(at: float, **field) -> Stamped:
    response = conveyor_pb2.RunResponse(**field)
    return Stamped(at, response.WhichOneof("event"), response)


def _dispatched(at, call, index, field="", deps=()):
    return _event(
        at,
        unit_dispatched=conveyor_pb2.UnitDispatched(
            call_id=call, index=index, field=field, depends_on=list(deps)
        ),
    )


def _result(at, call, index, duration):
    return _event(
        at,
        unit_result=conveyor_pb2.ToolUnitResult(
            call_id=call,
            result=common_pb2.UnitResult(index=index, ok=True, duration_seconds=duration),
        ),
    )


def test_the_ideal_bound_chains_units_and_follows_plan_dependencies():
    t = RunTimeline(0.0)
    t.events = [
        _event(0.0, round_started=conveyor_pb2.RoundStarted(round=0)),
        _event(1.0, token_delta=conveyor_pb2.TokenDelta(text="a")),
        _dispatched(1.0, "call-0", 0),  # runs 1.0 → 3.0
        _dispatched(2.0, "call-0", 1),  # waits for unit 0: 3.0 → 4.0
        _event(2.5, token_delta=conveyor_pb2.TokenDelta(text="b")),
        _result(3.2, "call-0", 0, 2.0),
        _result(4.3, "call-0", 1, 1.0),
        _event(5.0, round_started=conveyor_pb2.RoundStarted(round=1)),
        _event(6.0, token_delta=conveyor_pb2.TokenDelta(text="c")),
        # A plan: step 2 needs step 1 (1.0 s of work from 6.0), step 3 does not.
        _dispatched(6.0, "call-1", 0, "1"),
        _dispatched(6.5, "call-1", 1, "2", deps=(1,)),
        _dispatched(6.6, "call-1", 2, "3"),
        _result(7.1, "call-1.1", 0, 1.0),
        _result(7.7, "call-1.3", 0, 0.5),
        _result(8.6, "call-1.2", 0, 1.5),  # could have run 7.0 → 8.5
        _event(9.0, token_delta=conveyor_pb2.TokenDelta(text="d")),
        _event(10.0, run_finished=conveyor_pb2.RunFinished()),
    ]
    t.finished = 10.0
    # Round 0 could end at 4.0 (took 5.0); round 1 at 9.0, its last token (took 5.0).
    assert t.ideal_latency() == pytest.approx(10.0 - 1.0 - 1.0)
    # Dispatch-to-start leaves out queueing behind the unit before.
    assert t.dispatch_to_start()[:2] == pytest.approx([0.2, 0.1])


def test_an_abort_verdict_ends_the_ideal_round_at_the_verdict():
    t = RunTimeline(0.0)
    t.events = [
        _event(0.0, round_started=conveyor_pb2.RoundStarted(round=0)),
        _dispatched(1.0, "call-0", 0, "origin"),
        _result(1.2, "call-0", 0, 0.1),
        _event(
            1.3,
            abort_verdict=conveyor_pb2.ToolAbortVerdict(
                call_id="call-0", verdict=common_pb2.AbortVerdict(unit_index=0)
            ),
        ),
        _event(1.4, token_delta=conveyor_pb2.TokenDelta(text="late")),
        _event(2.0, run_finished=conveyor_pb2.RunFinished()),
    ]
    t.finished = 2.0
    assert t.ideal_latency() == pytest.approx(1.1)


def _row(workload: str, partial: float, sequential: float, ideal: float) -> dict:
    return {
        "workload": workload,
        "partial_s": partial,
        "sequential_s": sequential,
        "ideal_s": ideal,
        "expect_abort": False,
        "same_results": True,
        "tokens": {"partial": 100, "sequential": 100},
    }


def test_a_saving_within_the_paired_runs_noise_is_not_scored():
    from bench import common
    from bench.e2e import report
    from bench.e2e.__main__ import summarize

    rows = [
        # search: a steady 2 s saving of a possible 2.1 s.
        *(_row("search", 8.0 + d, 10.0 + d, 7.9 + d) for d in (0.0, 0.3, -0.2, 0.1)),
        # database: 0.1 s possible, but the modes wander ±1 s apart.
        *(_row("database", 10.0 + d, 10.0, 9.9) for d in (1.0, -1.0, 0.8, -0.9)),
    ]
    search, database = summarize(rows)
    assert search["share_of_ideal_pct"] == pytest.approx(100 * 2.0 / 2.1)
    assert search["paired_noise_s"] == pytest.approx(0.0, abs=1e-9)
    # The standard error of the mean of the differences -1, 1, -0.8, 0.9.
    assert database["paired_noise_s"] == pytest.approx(1.072 / 2, abs=0.001)
    goals = report.markdown(
        {
            "date": "today",
            "machine": common.machine(),
            "config": {"model": "m", "requests_per_workload": 4, "search_latency": "none"},
            "workloads": [search, database],
            "runs": rows,
            "overheads": {},
        }
    )
    assert "- search: 95.2 % of the ideal saving (goal ≥ 90 %) — met" in goals
    assert "- database: the possible saving, 0.10 s, is within the noise" in goals


# The quick run is 6 warm-ups and 12 measured runs of ~12 s each on a 2-core
# CPU, plus starting the stack: ~5 min here, more on a loaded CI machine.
@pytest.mark.real_model
@pytest.mark.timeout(1200)
def test_quick_run_reports_every_workload(tmp_path, capsys):
    from bench.e2e.__main__ import main

    out = tmp_path / "e2e"
    assert main(["--quick", "--out", str(out)]) == 0
    results = json.loads(out.with_name("e2e.json").read_text(encoding="utf-8"))
    md = out.with_name("e2e.md").read_text(encoding="utf-8")
    assert md in capsys.readouterr().out
    assert out.with_name("e2e.png").stat().st_size > 10_000
    assert [w["workload"] for w in results["workloads"]] == list(workloads.WORKLOADS)
    for w in results["workloads"]:
        assert w["requests"] == 1 and w["same_results"], w
        assert w["partial_mean_s"] > 0 and w["sequential_mean_s"] > 0
    finishes = {r["workload"]: r["finish"] for r in results["runs"]}
    assert finishes["validation"] == {"partial": "ABORTED", "sequential": "ABORTED"}
    assert all(
        f == {"partial": "FORCED_END", "sequential": "FORCED_END"}
        for w, f in finishes.items()
        if w != "validation"
    )
    hop = results["overheads"]["hop"]
    assert hop["pairs"] >= 2 and hop["deltas"] > 10
    assert {p["mode"] for p in results["overheads"]["parsers"]} >= {"PYTHON_STATEMENTS"}
