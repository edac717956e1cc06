"""Packed linears compute what nn.Linear computes: same greedy tokens on the
default model, prefill and decode, and only where packing applies; float32
is packed only on the probe's verdict, measured once and stored."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from llm_worker import linear_probe, packed_linear
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


def _forced(model, ids: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Float logits [rows, steps + 1, vocab] of the prefill and of a decode
    step per forced token (with the model's own cache)."""
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True)
        logits, cache = [out.logits[:, -1].float()], out.past_key_values
        for token in tokens.T:
            out = model(input_ids=token[:, None], past_key_values=cache, use_cache=True)
            logits.append(out.logits[:, -1].float())
            cache = out.past_key_values
    return torch.stack(logits, dim=1)


@native
def test_packed_model_decodes_the_same_tokens():
    """Both models fed the plain model's greedy tokens: their logits agree
    to bf16's rounding, and so does their top token wherever the plain
    model's top two are apart by more than that rounding. (Free-running
    greedy text may part at a near-tie: oneDNN's packed kernels sum in
    another order, and bf16 rounds each sum.)"""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_worker.model_cache import resolve

    path = resolve("").path
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    packed = copy.deepcopy(plain)
    linears = sum(type(m) is torch.nn.Linear for m in plain.modules())
    assert pack_linears(packed) == linears > 0
    assert not any(type(m) is torch.nn.Linear for m in packed.modules())
    assert isinstance(packed.lm_head, PackedLinear)
    texts = [  # prose, so most next tokens are clear; batched: rows and a prefill
        "The capital of France is Paris, and the capital of Italy is Rome. Berlin is",
        "def add(a, b):\n    return a + b\n\n\ndef multiply(a, b):\n    return",
        "Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday. January,",
    ]
    encoded = [AutoTokenizer.from_pretrained(path).encode(t) for t in texts]
    ids = torch.tensor([e[: min(map(len, encoded))] for e in encoded])
    with torch.inference_mode():
        greedy = plain.generate(ids, max_new_tokens=12, do_sample=False)[:, ids.shape[1] :]
    want, got = _forced(plain, ids, greedy[:, :-1]), _forced(packed, ids, greedy[:, :-1])
    assert torch.equal(want.argmax(-1), greedy)
    rounding = 1.0  # seen: 0.69 after 30 bf16 layers; a wrong layout is off by far more
    assert (got - want).abs().max() <= rounding
    top2 = want.topk(2, dim=-1).values
    clear = top2[..., 0] - top2[..., 1] > rounding
    assert clear.float().mean() > 0.5  # most steps are not near-ties
    assert torch.equal(got.argmax(-1)[clear], greedy[clear])
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
    not packed_linear._ops_available(), reason="packing needs torch's oneDNN linear ops"
)


class FixedProbe:
    """A Probe with a given stored verdict (None: none yet) whose measurement
    says pack, or fails; records the module it saw at each toggle."""

    def __init__(self, stored: bool | None, fails: bool = False):
        self.stored, self.fails = stored, fails
        self.seen: list[type] = []

    def known(self, model):
        return self.stored

    def decide(self, model, toggle):
        for packed in (False, True, False):
            toggle(packed)
            self.seen.append(type(model[0]))
        if self.fails:
            raise RuntimeError("probe broke")
        return True


def test_float32_is_packed_only_on_a_probes_verdict():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    assert pack_linears(model) == 0  # auto with no probe: float32 stays plain
    assert pack_linears(model, "off") == 0
    assert type(model[0]) is torch.nn.Linear


@onednn
def test_the_probe_toggles_both_ways_and_its_verdict_stands():
    plain = torch.nn.Linear(8, 8)
    model = torch.nn.Sequential(plain)
    probe = FixedProbe(None)
    assert pack_linears(model, "auto", probe) == 1
    assert probe.seen == [torch.nn.Linear, PackedLinear, torch.nn.Linear]
    assert isinstance(model[0], PackedLinear)


@onednn
@pytest.mark.parametrize("stored", [True, False])
def test_a_stored_verdict_is_taken_without_measuring(stored):
    plain = torch.nn.Linear(8, 8)
    model = torch.nn.Sequential(plain)
    probe = FixedProbe(stored)
    assert pack_linears(model, "auto", probe) == (1 if stored else 0)
    assert probe.seen == []
    assert isinstance(model[0], PackedLinear) if stored else model[0] is plain


@onednn
def test_a_failing_probe_leaves_float32_plain_and_the_load_goes_on():
    plain = torch.nn.Linear(8, 8)
    model = torch.nn.Sequential(plain)
    assert pack_linears(model, "auto", FixedProbe(None, fails=True)) == 0
    assert model[0] is plain  # the very module, weights untouched


@onednn
def test_no_room_for_a_second_copy_means_no_probe(monkeypatch):
    monkeypatch.setattr(packed_linear, "_available_memory", lambda: 100)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    probe = FixedProbe(None)
    assert pack_linears(model, "auto", probe) == 0
    assert probe.seen == [] and type(model[0]) is torch.nn.Linear


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


def _tiny_llama(hidden: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


class Counting:
    """The real verdicts, recording whether a measurement toggled."""

    def __init__(self, verdicts):
        self.verdicts, self.toggled = verdicts, []

    def known(self, model):
        return self.verdicts.known(model)

    def decide(self, model, toggle):
        def counting(packed):
            self.toggled.append(packed)
            toggle(packed)

        return self.verdicts.decide(model, counting)


def _stored(tmp_path) -> dict:
    return json.loads((tmp_path / linear_probe.VERDICTS).read_text())


@onednn
def test_the_probe_measures_once_per_shape_and_reuses_its_stored_verdict(tmp_path):
    with linear_probe.verdicts(str(tmp_path)) as verdicts:
        probe = Counting(verdicts)
        first = pack_linears(_tiny_llama(), "auto", probe)
        (verdict,) = _stored(tmp_path).values()
        assert set(verdict["speedup"]) == {str(r) for r in linear_probe.PROBE_ROWS}
        assert all(s > 0 for s in verdict["speedup"].values())
        assert True in probe.toggled  # it timed the packed way
        assert (first > 0) is verdict["pack"]

        probe = Counting(verdicts)
        assert pack_linears(_tiny_llama(), "auto", probe) == first
        assert probe.toggled == []  # the stored verdict, not a new measurement

        # Other shapes: a verdict of their own, keyed off the plain linears.
        other = _tiny_llama(hidden=32)
        key = linear_probe.verdict_key(other)
        pack_linears(other, "auto", Counting(verdicts))
        assert key in _stored(tmp_path) and len(_stored(tmp_path)) == 2


@onednn
@pytest.mark.parametrize("content", ["{not json", "[" * 100_000, '{"KEY": {"pack": "yes"}}'])
def test_a_malformed_verdict_file_is_measured_again(tmp_path, content):
    model = _tiny_llama()
    key = linear_probe.verdict_key(model)
    (tmp_path / linear_probe.VERDICTS).write_text(content.replace("KEY", key))
    with linear_probe.verdicts(str(tmp_path)) as verdicts:
        probe = Counting(verdicts)
        pack_linears(model, "auto", probe)
    assert True in probe.toggled
    assert isinstance(_stored(tmp_path)[key]["pack"], bool)


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


@pytest.mark.parametrize("mode", ["off", "on"])
def test_a_start_that_needs_no_verdict_never_touches_the_cache(tmp_path, mode):
    cache = tmp_path / "cache"
    with linear_probe.verdicts(str(cache)) as verdicts:
        pack_linears(torch.nn.Sequential(torch.nn.Linear(8, 8)), mode, verdicts)
    assert not cache.exists()
