"""Fused projections (llm_worker/fused_linear.py): the fused linear's parts
are the separate linears' outputs; the forward computes it once per input;
the fused model decodes as the model with its linears apart, holds no
second copy of the weights, and is what the loader gives the lean step."""

from __future__ import annotations

import pytest
import torch

from llm_worker.config import WorkerConfig
from llm_worker.fused_linear import FusedLinear, LinearPart, fuse_projections
from llm_worker.loader import load
from tests.test_decode_step import _llama, _tiny


def _linears(bias: bool, dtype=torch.float32) -> list[torch.nn.Linear]:
    torch.manual_seed(0)
    return [torch.nn.Linear(32, n, bias=bias, dtype=dtype) for n in (48, 16, 16)]


@pytest.mark.parametrize("bias", [False, True])
def test_the_parts_are_the_separate_linears_outputs(bias):
    linears = _linears(bias)
    fused = FusedLinear(linears)
    x = torch.randn(3, 5, 32)
    with torch.inference_mode():
        got = fused(x).split(fused.sizes, dim=-1)
        for part, linear in zip(got, linears, strict=True):
            assert part.shape == (3, 5, linear.out_features)
            torch.testing.assert_close(part, linear(x), rtol=1e-6, atol=1e-6)


class _Counting(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


def test_the_forward_computes_the_fused_output_once_per_input():
    linears = _linears(bias=True)
    fused = FusedLinear(linears)
    fused.linear = counting = _Counting(fused.linear)
    parts = [LinearPart(fused, i, 32, p.out_features) for i, p in enumerate(linears)]
    x, y = torch.randn(2, 32), torch.randn(2, 32)
    with torch.inference_mode():
        outs = [part(x) for part in parts]
        assert counting.calls == 1 and fused._pending is None  # dropped once all were taken
        for out, linear in zip(outs, linears, strict=True):
            torch.testing.assert_close(out, linear(x), rtol=1e-6, atol=1e-6)
        # A part asked for twice, or another input, computes afresh.
        parts[0](x)
        parts[0](x)
        assert counting.calls == 3
        torch.testing.assert_close(parts[1](y), linears[1](y), rtol=1e-6, atol=1e-6)
        assert counting.calls == 4
        torch.testing.assert_close(parts[2](x), linears[2](x), rtol=1e-6, atol=1e-6)
        assert counting.calls == 5


def _tiny_llama() -> torch.nn.Module:
    return _tiny(_llama(num_hidden_layers=3))


def _greedy(model, ids: torch.Tensor, steps: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True)
        logits, tokens = [out.logits[:, -1]], [out.logits[:, -1:].argmax(-1)]
        for _ in range(steps):
            out = model(input_ids=tokens[-1], past_key_values=out.past_key_values, use_cache=True)
            logits.append(out.logits[:, -1])
            tokens.append(out.logits[:, -1:].argmax(-1))
    return torch.cat(tokens, dim=1), logits


def test_a_fused_model_decodes_as_the_model_apart_with_one_copy_of_its_weights():
    apart, fused = _tiny_llama(), _tiny_llama()
    weights = sum(p.numel() for p in apart.parameters())
    assert fuse_projections(fused) == 6
    assert sum(p.numel() for p in fused.parameters()) == weights
    attn, mlp = fused.model.layers[0].self_attn, fused.model.layers[0].mlp
    assert all(isinstance(getattr(attn, n), LinearPart) for n in ("q_proj", "k_proj", "v_proj"))
    assert isinstance(mlp.gate_proj, LinearPart) and isinstance(mlp.up_proj, LinearPart)
    assert attn.qkv_proj.sizes == [64, 32, 32] and mlp.gate_up_proj.sizes == [128, 128]
    ids = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(1))
    want_tokens, want = _greedy(apart, ids, 6)
    got_tokens, got = _greedy(fused, ids, 6)
    assert torch.equal(got_tokens, want_tokens)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_fusing_twice_changes_nothing():
    model = _tiny_llama()
    assert fuse_projections(model) == 6
    assert fuse_projections(model) == 0  # the parts are no longer plain linears


@pytest.mark.parametrize(("decode_step", "fused"), [("auto", True), ("transformers", False)])
def test_the_loader_fuses_for_the_lean_step_only(default_model_dir, decode_step, fused):
    model, _, _ = load(
        WorkerConfig(
            model=str(default_model_dir),
            dtype="float32",
            pack_linears="off",
            decode_step=decode_step,
        )
    )
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.q_proj, LinearPart) is fused
    assert hasattr(attn, "qkv_proj") is fused
