"""The CPU decode-attention kernel (llm_worker/kernels/decode_attention.cpp)
against attention's math in float64: every dtype and head size it serves,
grouped and plain heads, rows of every length class (a whole tile of 16,
tails, one column), keys and values that are views of larger buffers, the
split of a lone row's columns across threads; padding it must skip (NaN
there changes nothing); the checks that guard it; and the lean step on the
default model, which uses it by default, within float rounding of the
transformers forward."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from llm_worker import cpp_kernel, decode_attention
from llm_worker.decode_attention import load_kernel, row_starts
from llm_worker.decode_step import BF16_LOGIT_SHARE, LeanDecode, decode_step_for
from tests.test_decode_step import assert_within_rounding

pytestmark = pytest.mark.skipif(shutil.which("c++") is None, reason="needs a C++ compiler")


@pytest.fixture(scope="module")
def kernel():
    built = load_kernel()
    assert built is not None, "the kernel did not build (see the log)"
    return built


def _reference(q, keys, values, starts, scale):
    """Attention's math per row in float64, over each row's real columns."""
    rows, heads, dim = q.shape
    groups = heads // keys.shape[1]
    out = torch.empty(rows, heads, dim, dtype=torch.float64)
    for r in range(rows):
        k = keys[r, :, int(starts[r]) :].double().repeat_interleave(groups, dim=0)
        v = values[r, :, int(starts[r]) :].double().repeat_interleave(groups, dim=0)
        weights = torch.softmax((k @ q[r].double()[:, :, None]).squeeze(-1) * scale, dim=-1)
        out[r] = (weights[:, None, :] @ v).squeeze(1)
    return out


def _inputs(rows, heads, kv_heads, dim, columns, dtype, seed=0, capacity=None):
    """q and keys/values as the cache holds them: views of the first
    `columns` of larger buffers."""
    g = torch.Generator().manual_seed(seed)
    capacity = capacity or columns + 13
    q = torch.randn(rows, heads, dim, generator=g).to(dtype)
    keys = torch.randn(rows, kv_heads, capacity, dim, generator=g).to(dtype)[:, :, :columns]
    values = torch.randn(rows, kv_heads, capacity, dim, generator=g).to(dtype)[:, :, :columns]
    return q, keys, values


_TOLERANCE = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=1.6e-2, atol=2e-2),  # the output's rounding to bf16
    torch.float16: dict(rtol=2e-3, atol=2e-3),
}


@pytest.mark.parametrize("dtype", list(_TOLERANCE), ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize(
    ("heads", "kv_heads"), [(9, 3), (4, 4), (14, 2)], ids=["gqa3", "mha", "gqa7"]
)
def test_the_kernel_is_attention_on_each_rows_real_columns(kernel, dtype, dim, heads, kv_heads):
    # 100, 99, 16 and 1 real columns: tiles and tails, one tile, one key.
    q, keys, values = _inputs(4, heads, kv_heads, dim, 100, dtype)
    starts = torch.tensor([0, 1, 84, 99])
    scale = 1 / math.sqrt(dim)
    got = kernel(q, keys, values, starts, scale)
    assert got.shape == q.shape and got.dtype == dtype
    torch.testing.assert_close(
        got.double(), _reference(q, keys, values, starts, scale), **_TOLERANCE[dtype]
    )


@pytest.mark.parametrize(("columns", "start"), [(700, 5), (200, 198)], ids=["long", "empty part"])
def test_a_lone_rows_columns_split_across_threads_merge_exactly(kernel, columns, start):
    """One row has as few items as kv heads, so its columns are cut into
    parts (one is empty when the row is this short, at 2 threads or more)
    and merged."""
    q, keys, values = _inputs(1, 9, 3, 64, columns, torch.float32, seed=1)
    starts = torch.tensor([start])
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        got = kernel(q, keys, values, starts, 0.125)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(
        got.double(), _reference(q, keys, values, starts, 0.125), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_strided_queries_and_cache_rows_are_read_where_they_are(kernel, dtype):
    """q's heads and the cache's columns further apart than the head dim
    (views into wider tensors), as other cache layouts may hand them over."""
    wide_q, wide_k, wide_v = _inputs(3, 9, 3, 128, 40, dtype, seed=3)
    q, keys, values = wide_q[..., :64], wide_k[..., 64:], wide_v[..., :64]
    assert q.stride(1) == 128 and keys.stride(2) == 128
    starts = torch.tensor([0, 7, 39])
    torch.testing.assert_close(
        kernel(q, keys, values, starts, 0.125).double(),
        _reference(q, keys, values, starts, 0.125),
        **_TOLERANCE[dtype],
    )


def test_padding_is_skipped_not_masked(kernel):
    """NaN in the padded columns reaches no output: they are never read."""
    q, keys, values = _inputs(3, 9, 3, 64, 50, torch.bfloat16, seed=2)
    starts = torch.tensor([0, 20, 49])
    want = kernel(q, keys, values, starts, 0.125)
    for r, s in enumerate(starts.tolist()):
        keys[r, :, :s] = float("nan")
        values[r, :, :s] = float("inf")
    got = kernel(q, keys, values, starts, 0.125)
    assert torch.isfinite(got).all() and torch.equal(got, want)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda q, k, v, s: (q, k, v, torch.tensor([0, 50])), "row 1 has no column"),
        (lambda q, k, v, s: (q, k, v, torch.tensor([-1, 0])), "row 0 has no column"),
        (lambda q, k, v, s: (q, k.float(), v, s), "one dtype"),
        (lambda q, k, v, s: (q[:, :, :32], k[..., :32], v[..., :32], s), "head dim 32"),
        (lambda q, k, v, s: (q[:, :8], k, v, s), "heads per kv head"),
        (lambda q, k, v, s: (q, k, v, s.int()), "starts"),
        (lambda q, k, v, s: (q, k, v[:, :, :10], s), "shapes"),
        (lambda q, k, v, s: (q[:0], k[:0], v[:0], s[:0]), "no rows"),
        (
            lambda q, k, v, s: (torch.cat([q] * 4, dim=1)[:, :34], k[:, :2], v[:, :2], s),
            "heads per kv head",
        ),
    ],
    ids=[
        "start past the end",
        "negative start",
        "dtypes",
        "head dim",
        "heads",
        "starts dtype",
        "shapes",
        "no rows",
        "17 heads per kv head",
    ],
)
def test_what_the_kernel_cannot_serve_is_a_clear_error(kernel, change, message):
    q, keys, values = _inputs(2, 9, 3, 64, 50, torch.bfloat16)
    args = change(q, keys, values, torch.tensor([0, 3]))
    with pytest.raises(RuntimeError, match=message):
        kernel(*args, 0.125)


def test_row_starts_reads_left_padding_and_refuses_anything_else():
    assert torch.equal(row_starts(None, 3), torch.zeros(3, dtype=torch.long))
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]])
    assert row_starts(mask, 3).tolist() == [0, 2, 3]
    assert row_starts(torch.tensor([[1, 0, 1, 1]]), 1) is None  # a hole
    assert row_starts(torch.tensor([[1, 1], [0, 0]]), 2) is None  # a row with nothing


def test_a_build_lock_left_by_a_killed_build_does_not_hang_the_next_start(kernel, monkeypatch):
    """torch waits forever on the lock file a killed build leaves; the
    loader's own flock (released by the OS) lets it clear that file."""
    import threading

    where = cpp_kernel.built_at("decode_attention")
    (where / "lock").write_text("")
    monkeypatch.setattr(cpp_kernel, "_built", {})
    loaded: list = []
    thread = threading.Thread(target=lambda: loaded.append(load_kernel()), daemon=True)
    thread.start()
    thread.join(timeout=120)
    assert loaded and loaded[0] is not None and not (where / "lock").exists()


def test_a_missing_source_leaves_sdpa_serving(tmp_path, monkeypatch):
    monkeypatch.setattr(decode_attention, "SOURCE", tmp_path / "gone.cpp")
    assert load_kernel(str(tmp_path)) is None


def test_a_kernel_that_does_not_build_leaves_sdpa_serving(tmp_path, monkeypatch, default_model_dir):
    broken = tmp_path / "decode_attention.cpp"
    broken.write_text("#error this compiler refuses\n")
    monkeypatch.setattr(decode_attention, "SOURCE", broken)
    assert load_kernel(str(tmp_path)) is None
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    step = decode_step_for(model, cache_dir=str(tmp_path))
    assert isinstance(step, LeanDecode) and step.kernel is None


@pytest.mark.parametrize(
    ("dtype", "share", "mean_share"),
    # bf16: the kernel keeps scores, weights and sums in float32 and rounds
    # once; SDPA rounds elsewhere. The two differ more on average than SDPA's
    # two bf16 paths do (measured: 0.74 % of the largest logit, against their
    # 0.5 % bound); the bound on the largest difference is the same.
    [(torch.float32, 1e-4, None), (torch.bfloat16, BF16_LOGIT_SHARE, 0.015)],
    ids=["f32", "bf16"],
)
def test_the_lean_step_with_the_kernel_is_the_forward_to_rounding(
    default_model_dir, dtype, share, mean_share
):
    """The default: the lean step on the default model attends through the
    kernel. Fed the same tokens, padded rows' logits stay within rounding of
    the forward's, and in float32 greedy picks the same tokens."""
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=dtype).eval()
    lean = decode_step_for(model)
    assert isinstance(lean, LeanDecode) and lean.kernel is not None
    assert_within_rounding(model, lean, share, mean_share, same_greedy=dtype == torch.float32)
