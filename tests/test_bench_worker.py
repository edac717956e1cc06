"""The worker benchmark's quick path runs end to end on the real default
model and reports every level. Structure only: speed is never asserted here
(it lives in bench/)."""

from __future__ import annotations

import json

import pytest

from bench.worker.__main__ import main, prompts

pytestmark = pytest.mark.real_model


def test_prompts_are_distinct_real_text():
    texts = prompts(16)
    assert len(set(texts)) == 16 and all(len(t) > 100 for t in texts)


def test_quick_run_reports_every_level(tmp_path, capsys):
    out = tmp_path / "worker"
    assert main(["--quick", "--streams", "1,2", "--tokens", "6", "--out", str(out)]) == 0
    results = json.loads(out.with_name("worker.json").read_text(encoding="utf-8"))
    md = out.with_name("worker.md").read_text(encoding="utf-8")
    assert md in capsys.readouterr().out
    assert "| streams | aggregate tok/s |" in md and "generate(), sequential" in md
    assert [r["streams"] for r in results["rows"]] == [1, 2]
    for row in results["rows"]:
        # Forced decoding of generate()'s output: the same tokens on both sides.
        assert row["tokens"] >= row["streams"] * 5
        assert row["aggregate_tokens_per_s"] > 0 and row["ttft_mean_s"] > 0
        assert row["vs_generate"] > 0 and row["exact_streams"] == row["streams"]
    assert results["generate"]["tokens"] == 6
    assert results["config"]["device"] == "cpu" and results["machine"]["cpu_count"]


def test_kv_cache_quick_run_compares_both_caches(tmp_path, capsys):
    from bench.worker.kv_cache import main as kv_main

    out = tmp_path / "kv_cache"
    assert kv_main(["--quick", "--out", str(out)]) == 0
    results = json.loads(out.with_name("kv_cache.json").read_text(encoding="utf-8"))
    assert "| context | batch | DynamicCache step | GrowingLayer step |" in capsys.readouterr().out
    assert [(r["context"], r["batch"]) for r in results["rows"]] == [(64, 1), (64, 2)]
    for row in results["rows"]:
        assert row["dynamic_step_ms"] > 0 and row["growing_step_ms"] > 0 and row["speedup"] > 0


def test_decode_step_quick_run_compares_both_steps(tmp_path, capsys):
    from bench.worker.decode_step import main as step_main
    from llm_worker.decode_step import BF16_LOGIT_SHARE

    out = tmp_path / "decode_step"
    assert step_main(["--quick", "--out", str(out)]) == 0  # 0: the logits agreed
    results = json.loads(out.with_name("decode_step.json").read_text(encoding="utf-8"))
    printed = capsys.readouterr().out
    assert "| dtype | rows | transformers step | lean step |" in printed
    assert "| lean, linears apart | fusion speedup |" in printed
    assert [r["rows"] for r in results["rows"] if r["dtype"] == "float32"] == [1, 2]
    for row in results["rows"]:
        # Bit for bit but for padded bf16 rows, where one attention kernel
        # differs: there within the bound (on some CPUs, an AMD EPYC Zen 4,
        # its sums happened to land on the same floats).
        if row["dtype"] == "float32" or row["rows"] == 1:
            assert row["identical_logits"]
        assert row["max_logit_diff_share"] <= BF16_LOGIT_SHARE
        assert row["transformers_step_ms"] > 0 and row["lean_step_ms"] > 0
        # Fused projections against the same weights apart: a slice off by a
        # column would be far outside bf16's rounding.
        assert row["apart_step_ms"] > 0 and row["fusion_speedup"] > 0
        assert row["fused_logit_diff_share"] <= BF16_LOGIT_SHARE
        # The decode-linear kernel against torch's linears: float rounding,
        # in bf16 each linear's outputs rounded once more over 30 layers (up
        # to 3.0 % of the largest logit seen at 4 and 16 rows); a transposed
        # or shifted weight would be off by whole logits.
        assert row["torch_linears_step_ms"] > 0 and row["kernel_speedup"] > 0
        bound = 1e-4 if row["dtype"] == "float32" else 2 * BF16_LOGIT_SHARE
        assert row["kernel_logit_diff_share"] <= bound


def test_decode_linear_quick_run_compares_the_kernel_with_torchs_linears(tmp_path, capsys):
    from bench.worker.decode_linear import main as linear_main

    out = tmp_path / "decode_linear"
    assert linear_main(["--quick", "--out", str(out)]) == 0  # 0: every way agreed
    results = json.loads(out.with_name("decode_linear.json").read_text(encoding="utf-8"))
    assert (
        "| dtype | rows | weights | torch plain | torch packed | kernel |"
        in capsys.readouterr().out
    )
    assert results["bandwidth_gbs"] > 0
    assert [r["rows"] for r in results["rows"] if r["dtype"] == "float32"] == [1, 4]
    for row in results["rows"]:
        assert row["agrees"] and row["weight_mb"] > 100  # the whole step's weights
        assert min(row["plain_ms"], row["packed_ms"], row["kernel_ms"]) > 0


def test_decode_attention_quick_run_compares_kernel_and_sdpa(tmp_path, capsys):
    import shutil

    if shutil.which("c++") is None:
        pytest.skip("needs a C++ compiler")
    from bench.worker.decode_attention import main as attention_main

    out = tmp_path / "decode_attention"
    assert attention_main(["--quick", "--out", str(out)]) == 0  # 0: the two agreed
    results = json.loads(out.with_name("decode_attention.json").read_text(encoding="utf-8"))
    assert (
        "| dtype | rows | columns (real / padded) | SDPA ms | kernel ms |"
        in capsys.readouterr().out
    )
    assert [r["rows"] for r in results["rows"] if r["dtype"] == "float32"] == [1, 4]
    for row in results["rows"]:
        assert row["agrees"] and row["sdpa_ms"] > 0 and row["kernel_ms"] > 0
        assert row["real_columns"] < row["columns"] * row["rows"] or row["rows"] == 1
