"""The parser benchmark's quick path runs and reports every available mode.
Structure only: speed is never asserted here (it lives in bench/)."""

from __future__ import annotations

import ast
import json

import pytest

from bench.parsers import inputs, measure
from bench.parsers.__main__ import main
from bench.parsers.formats import FormatPipeline, available

ALL_KEYS = {spec[0] for spec in inputs.all_specs()}


@pytest.fixture(scope="module")
def tokenizer():
    tok, _ = measure.load_tokenizer()
    return tok


def test_inputs_are_real_and_valid():
    py = inputs.build("PYTHON_STATEMENTS", 1).text
    ast.parse(py)
    assert inputs.nbytes(py) <= 1024 and py.endswith("\n")
    assert inputs.build("PYTHON_STATEMENTS", 4).text.startswith(py)  # sizes share a prefix
    args = json.loads(inputs.build("JSON_FIELDS", 4).text)
    assert isinstance(args["filters"], dict) and isinstance(args["passages"], list)
    code = json.loads(inputs.build("JSON_FIELDS:code", 1).text)["code"]
    ast.parse(code)
    assert ";" in inputs.build("SQL_STATEMENTS", 1).text
    assert inputs.build("PLAN_STEPS", 1).text.startswith("$1 = ")


@pytest.mark.parametrize("name", available())
def test_each_format_row_cuts_its_call_into_the_codes_statements(name):
    text = inputs.build(f"FORMAT:{name}", 1).text
    code = inputs.python_source(1024)
    pipeline = FormatPipeline(name)
    units = [u for ch in text for u in pipeline.feed(ch)] + pipeline.finish()
    assert "".join(u.text for u in units) == code
    assert len(units) == len(ast.parse(code).body)


def test_token_deltas_rebuild_the_text(tokenizer):
    text = inputs.build("JSON_FIELDS", 1).text  # unicode and escapes included
    deltas = measure.token_deltas(text, tokenizer)
    assert "".join(deltas) == text
    assert all(deltas) and len(deltas) > len(text) / 10


def test_sample_indices_are_even_and_deterministic():
    assert measure.sample_indices(10, 300) == list(range(10))
    picked = measure.sample_indices(10_000, 300)
    assert picked == measure.sample_indices(10_000, 300)
    assert picked[0] == 0 and picked[-1] == 9_999 and len(picked) == 300


def test_quick_run_reports_every_available_mode(tmp_path, capsys, tokenizer):
    out = tmp_path / "results" / "parsers"
    assert main(["--quick", "--sizes", "1", "--out", str(out)], tokenizer=tokenizer) == 0
    printed = capsys.readouterr().out

    results = json.loads(out.with_name("parsers.json").read_text(encoding="utf-8"))
    md = out.with_name("parsers.md").read_text(encoding="utf-8")
    assert "| mode | input | size | deltas | units | median µs/delta |" in md
    assert md in printed
    for key in ("processor", "cpu_count", "python"):
        assert key in results["machine"]
    assert results["date"] and results["config"]["quick"] is True

    measured = {row["key"] for row in results["rows"]}
    skipped = {s["key"] for s in results["skipped"]}
    assert measured | skipped == ALL_KEYS and not measured & skipped
    assert {"PYTHON_STATEMENTS", "WHOLE"} <= measured  # these exist today
    for s in results["skipped"]:
        assert s["reason"] and f"skipping {s['key']}" in printed

    for row in results["rows"]:
        assert row["size_kb"] == 1 and row["deltas"] > 0 and row["units"] > 0
        ours = row["ours"]
        assert ours["median_us"] > 0 and ours["p99_us"] >= ours["median_us"]
        assert ours["mean_us"] > 0 and row["passes"] >= 2
        assert ours["samples"] == row["passes"] * row["deltas"]
        if row["mode"] == "JSON_FIELDS":
            assert set(row["baselines"]) == {"partial_json_parser", "jiter"}
            for name, base in row["baselines"].items():
                assert base["median_us"] > 0 and base["mean_us"] > 0
                assert row["ratio"][name] > 0
        else:
            assert row["baselines"] == {} and row["ratio"] == {}
        line = next(ln for ln in md.splitlines() if ln.startswith(f"| {row['mode']}"))
        assert "1 KB" in line

    goals = results["goals"]
    assert any(g["key"] == "PYTHON_STATEMENTS" for g in goals["median_at_most_us"])
    assert "## Goals" in md
