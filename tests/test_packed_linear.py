"""Packed bf16 linears compute what nn.Linear computes: same greedy tokens
on the default model, prefill and decode, and only where packing applies."""

from __future__ import annotations

import copy

import pytest
import torch

from llm_worker.loader import cpu_has_native_bf16
from llm_worker.packed_linear import PackedLinear, can_pack, pack_linears

native = pytest.mark.skipif(
    not (cpu_has_native_bf16() and torch.backends.mkldnn.is_available()),
    reason="packing applies only on CPUs with native bf16",
)


def _greedy(model, ids: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(prefill logits, greedy tokens) with the model's own cache."""
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True)
        first = out.logits[:, -1].float()
        cache, token, tokens = out.past_key_values, out.logits[:, -1:].argmax(-1), []
        for _ in range(steps):
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            tokens.append(token)
    return first, torch.cat(tokens, dim=1)


@native
def test_packed_model_decodes_the_same_tokens():
    from transformers import AutoModelForCausalLM

    from llm_worker.model_cache import resolve

    plain = AutoModelForCausalLM.from_pretrained(resolve("").path, dtype=torch.bfloat16).eval()
    packed = copy.deepcopy(plain)
    linears = sum(type(m) is torch.nn.Linear for m in plain.modules())
    assert pack_linears(packed) == linears > 0
    assert not any(type(m) is torch.nn.Linear for m in packed.modules())
    assert isinstance(packed.lm_head, PackedLinear)
    torch.manual_seed(0)
    ids = torch.randint(0, plain.config.vocab_size, (3, 40))  # batched: rows and a prefill
    want_logits, want = _greedy(plain, ids, 12)
    got_logits, got = _greedy(packed, ids, 12)
    assert torch.equal(got, want)
    assert torch.allclose(got_logits, want_logits, atol=0.1, rtol=0.02)
    # The tied embedding stays the plain weight; lm_head's packed copy is apart.
    assert torch.equal(packed.get_input_embeddings().weight, plain.get_input_embeddings().weight)


@native
def test_packed_linear_matches_linear_with_bias_and_any_leading_shape():
    linear = torch.nn.Linear(64, 96, bias=True).to(torch.bfloat16)
    packed = PackedLinear(linear)
    for shape in ((1, 64), (5, 64), (2, 7, 64)):
        x = torch.randn(shape, dtype=torch.bfloat16)
        with torch.inference_mode():
            assert torch.allclose(packed(x).float(), linear(x).float(), atol=0.05, rtol=0.02)
            assert packed(x).shape == (*shape[:-1], 96)


def test_float32_and_half_precision_off_native_cpus_are_left_alone():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    assert not can_pack(model)  # float32: packing measured slower
    assert pack_linears(model) == 0
    assert type(model[0]) is torch.nn.Linear


@native
def test_only_the_bf16_layers_of_a_mixed_model_are_packed():
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 8).to(torch.bfloat16),
        torch.nn.Linear(8, 8),  # float32 head
    )
    assert can_pack(model)
    assert pack_linears(model) == 1
    assert isinstance(model[0], PackedLinear) and type(model[1]) is torch.nn.Linear


def test_pack_linears_flag_values_are_checked():
    from llm_worker.config import WorkerConfig

    with pytest.raises(ValueError, match="--pack-linears"):
        WorkerConfig(pack_linears="on")
