"""Packed linears compute what nn.Linear computes: same greedy tokens on the
default model, prefill and decode, and only where packing applies; float32
is packed only on the probe's verdict, measured once and stored."""

from __future__ import annotations

import copy
import json

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


onednn = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available(), reason="packing needs torch's oneDNN"
)


def test_float32_is_packed_only_when_the_decider_says_so():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    assert pack_linears(model) == 0  # auto with no decider: float32 stays plain
    assert pack_linears(model, "off") == 0
    assert type(model[0]) is torch.nn.Linear


@onednn
@pytest.mark.parametrize("verdict", [True, False])
def test_the_decider_times_both_ways_and_its_verdict_stands(verdict):
    plain = torch.nn.Linear(8, 8)
    model = torch.nn.Sequential(plain)
    seen = []

    def decide(toggle):
        for packed in (False, True, False):
            toggle(packed)
            seen.append(type(model[0]))
        return verdict

    assert pack_linears(model, "auto", decide) == (1 if verdict else 0)
    assert seen == [torch.nn.Linear, PackedLinear, torch.nn.Linear]
    if verdict:
        assert isinstance(model[0], PackedLinear)
    else:
        assert model[0] is plain  # the very module, weights untouched


@onednn
def test_float32_packed_model_decodes_the_same_tokens():
    from transformers import AutoModelForCausalLM

    from llm_worker.model_cache import resolve

    plain = AutoModelForCausalLM.from_pretrained(resolve("").path, dtype=torch.float32).eval()
    packed = copy.deepcopy(plain)
    linears = sum(type(m) is torch.nn.Linear for m in plain.modules())
    assert pack_linears(packed, "on") == linears > 0
    torch.manual_seed(0)
    ids = torch.randint(0, plain.config.vocab_size, (3, 40))
    want_logits, want = _greedy(plain, ids, 12)
    got_logits, got = _greedy(packed, ids, 12)
    assert torch.equal(got, want)
    assert torch.allclose(got_logits, want_logits, atol=1e-3, rtol=1e-3)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


@onednn
def test_the_probe_measures_once_and_reuses_its_stored_verdict(tmp_path):
    from llm_worker import linear_probe

    model = _tiny_llama()
    measured = []

    def decide(toggle):
        def counting(packed):
            measured.append(packed)
            toggle(packed)

        return linear_probe.packing_pays(model, counting, str(tmp_path))

    first = pack_linears(model, "auto", decide)
    stored = json.loads((tmp_path / linear_probe.VERDICTS).read_text())
    (verdict,) = stored.values()
    assert set(verdict["speedup"]) == {str(r) for r in linear_probe.PROBE_ROWS}
    assert all(s > 0 for s in verdict["speedup"].values())
    assert True in measured  # it timed the packed way
    assert (first > 0) is verdict["pack"]

    model, measured[:] = _tiny_llama(), []
    assert pack_linears(model, "auto", decide) == first
    assert True not in measured  # the stored verdict, not a new measurement


@onednn
def test_an_unreadable_verdict_file_is_measured_again(tmp_path):
    from llm_worker import linear_probe

    (tmp_path / linear_probe.VERDICTS).write_text("{not json")
    model = _tiny_llama()
    pack_linears(model, "auto", lambda t: linear_probe.packing_pays(model, t, str(tmp_path)))
    stored = json.loads((tmp_path / linear_probe.VERDICTS).read_text())
    assert len(stored) == 1


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
        WorkerConfig(pack_linears="fast")
