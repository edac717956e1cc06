"""The CPU decode-linear kernel (llm_worker/kernels/decode_linear.cpp)
against a linear in float64: each dtype it serves, every row count of its
register blocks (1–4 and beyond), output widths that leave a tail, biases,
a weight shared with the embedding; its results for a row do not depend on
the other rows of the batch; the checks that guard it; `KernelLinear`'s
split between the kernel and torch; and the loader's swap, with the
default model's greedy text unchanged."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from llm_worker import cpp_kernel, decode_linear
from llm_worker.config import WorkerConfig
from llm_worker.decode_linear import MAX_ROWS, KernelLinear, load_kernel, use_decode_linears
from llm_worker.loader import load
from llm_worker.packed_linear import pack_linears

pytestmark = pytest.mark.skipif(shutil.which("c++") is None, reason="needs a C++ compiler")

# Float32 sums in another order: a few ulps of the largest term's scale;
# bf16 outputs are rounded once to bf16 (8 bits of mantissa).
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 8e-3}


@pytest.fixture(scope="module")
def kernel():
    built = load_kernel()
    assert built is not None, "the kernel did not build (see the log)"
    return built


@pytest.fixture
def avx512(monkeypatch):
    """The swap as on an AVX-512 CPU, whatever this one is: the kernel
    itself builds and computes the same on AVX2 (only its speed there is
    unmeasured)."""
    monkeypatch.setattr(decode_linear, "cpu_has_avx512", lambda: True)


def _inputs(rows, in_features, out_features, dtype, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_features, generator=g).to(dtype)
    w = (torch.randn(out_features, in_features, generator=g) / in_features**0.5).to(dtype)
    b = torch.randn(out_features, generator=g).to(dtype) if bias else None
    return x, w, b


def _assert_close(got, x, w, b):
    """Against the exact product of the same (rounded) inputs."""
    want = x.double() @ w.double().T + (b.double() if b is not None else 0)
    scale = (x.double().abs() @ w.double().abs().T).max() + 1
    err = float((got.double() - want).abs().max() / scale)
    assert err <= TOLERANCE[x.dtype], err
    assert got.dtype == x.dtype and got.shape == want.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 13, 16])
@pytest.mark.parametrize(("in_features", "out_features"), [(576, 960), (1536, 576), (64, 7)])
def test_the_kernel_is_the_linear(kernel, dtype, rows, in_features, out_features):
    x, w, _ = _inputs(rows, in_features, out_features, dtype)
    _assert_close(kernel(x, w, None), x, w, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_bias_is_added(kernel, dtype):
    x, w, b = _inputs(3, 128, 66, dtype, bias=True)
    _assert_close(kernel(x, w, b), x, w, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_features", [130, 132])
def test_a_rows_result_does_not_depend_on_its_batch(kernel, dtype, out_features):
    """Each output is one weight row's sum in a fixed order, whichever
    register block its row fell in (blocks of 16, 8 or 4 weight rows by batch
    size, so 132 outputs leave a tail at some sizes and none at others): a
    stream's logits are the same alone and in any batch (torch's gemms choose
    kernels by batch size)."""
    x, w, _ = _inputs(11, 576, out_features, dtype)
    batched = kernel(x, w, None)
    for r in range(11):
        assert torch.equal(kernel(x[r : r + 1], w, None), batched[r : r + 1])
    assert torch.equal(kernel(x[3:9], w, None), batched[3:9])


def test_strided_rows_are_read_where_they_are(kernel):
    x, w, _ = _inputs(4, 128, 32, torch.float32)
    wide = torch.zeros(4, 256)
    wide[:, 64:192] = x
    assert torch.equal(kernel(wide[:, 64:192], w, None), kernel(x, w, None))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda x, w, b: (x[:, :64], w, b), "features"),
        (lambda x, w, b: (x[:, :72], w[:, :72].contiguous(), b), "multiple of 16"),
        (lambda x, w, b: (x.double(), w.double(), b), "dtype"),
        (lambda x, w, b: (x.bfloat16(), w, b), "one dtype"),
        (lambda x, w, b: (x, w.T.contiguous().T, b), "contiguous"),
        (lambda x, w, b: (x, w, torch.zeros(3)), "bias"),
        (lambda x, w, b: (x[0], w, b), r"\[rows, in\]"),
    ],
    ids=["in features", "in multiple", "float64", "mixed dtypes", "strided weight", "bias", "1-d"],
)
def test_what_the_kernel_cannot_serve_is_a_clear_error(kernel, change, message):
    x, w, _ = _inputs(2, 128, 128, torch.float32)
    with pytest.raises(RuntimeError, match=message):
        kernel(*change(x, w, None))


def test_kernel_linear_sends_decode_rows_to_the_kernel_and_prefills_to_torch(kernel):
    linear = torch.nn.Linear(128, 40, bias=True)
    wrapped = KernelLinear(linear, kernel)
    assert wrapped.weight is linear.weight and wrapped.bias is linear.bias  # no copy
    with torch.inference_mode():
        small = torch.randn(2, 3, 128)  # 6 rows
        assert torch.equal(
            wrapped(small),
            kernel(small.reshape(6, 128), linear.weight, linear.bias).reshape(2, 3, 40),
        )
        large = torch.randn(1, MAX_ROWS + 1, 128)
        assert torch.equal(wrapped(large), F.linear(large, linear.weight, linear.bias))


def test_kernel_linear_leaves_autograd_to_torch(kernel):
    """Outside inference mode (the engine decodes inside it) a weight that
    wants gradients goes to F.linear, which records them."""
    linear = torch.nn.Linear(64, 16)
    out = KernelLinear(linear, kernel)(torch.randn(2, 64))
    assert out.grad_fn is not None
    out.sum().backward()
    assert linear.weight.grad is not None


def test_use_decode_linears_swaps_every_servable_linear_and_packing_leaves_them(kernel, avx512):
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 32),
        torch.nn.Linear(32, 8).bfloat16(),
        torch.nn.Linear(8, 8),  # 8 features: not a multiple of 16
        torch.nn.Linear(32, 32).double(),  # a dtype the kernel does not serve
    )
    assert use_decode_linears(model, "torch") == 0
    assert use_decode_linears(model) == 2
    assert [type(m) for m in model] == [
        KernelLinear,
        KernelLinear,
        torch.nn.Linear,
        torch.nn.Linear,
    ]
    assert pack_linears(model, "on") == 1  # the float32 8×8 only: one copy of each weight
    with pytest.raises(ValueError, match="--decode-linear"):
        use_decode_linears(model, "fast")


def test_without_avx512_auto_keeps_torchs_linears(monkeypatch):
    monkeypatch.setattr(decode_linear, "cpu_has_avx512", lambda: False)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32))
    assert use_decode_linears(model) == 0
    assert type(model[0]) is torch.nn.Linear


def test_a_kernel_that_does_not_build_leaves_torchs_linears(tmp_path, monkeypatch, avx512):
    broken = tmp_path / "decode_linear.cpp"
    broken.write_text("#error this compiler refuses\n")
    monkeypatch.setattr(decode_linear, "SOURCE", broken)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32))
    assert use_decode_linears(model, cache_dir=str(tmp_path)) == 0
    assert type(model[0]) is torch.nn.Linear


def test_a_build_lock_left_by_a_killed_build_does_not_hang_the_next_start(kernel, monkeypatch):
    where = cpp_kernel.built_at("decode_linear")
    (where / "lock").write_text("")
    monkeypatch.setattr(cpp_kernel, "_built", {})
    assert load_kernel() is not None and not (where / "lock").exists()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_loaded_model_decodes_the_same_text_on_the_kernel(
    kernel, avx512, default_model_dir, dtype
):
    """The default model as the worker loads it, on the kernel and on
    torch's linears: the same greedy text, and the tied lm_head still reads
    the embedding's weight."""
    texts = {}
    for mode in ("auto", "torch"):
        model, tokenizer, _ = load(
            WorkerConfig(model=str(default_model_dir), dtype=dtype, decode_linear=mode)
        )
        on_kernel = isinstance(model.lm_head, KernelLinear)
        assert on_kernel is (mode == "auto")
        if on_kernel:
            assert model.lm_head.weight is model.model.embed_tokens.weight
        ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
        with torch.inference_mode():
            texts[mode] = model.generate(ids, max_new_tokens=24, do_sample=False)[0].tolist()
    assert texts["auto"] == texts["torch"]


def test_decode_linear_flag_values_are_checked():
    with pytest.raises(ValueError, match="--decode-linear"):
        WorkerConfig(decode_linear="fast")
