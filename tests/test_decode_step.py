"""The lean decode step computes the transformers forward's logits bit for
bit: on the default model (float32, packed linears, unpadded bfloat16), on
padded and unpadded batches, on Qwen2's biased projections and plain
multi-head attention; padded bfloat16 rows on CPU within bf16's rounding
(one attention kernel differs there); every other model keeps the
transformers forward."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from llm_worker.decode_step import (
    BF16_LOGIT_SHARE,
    LeanDecode,
    ModelDecode,
    decode_step_for,
    unsupported_reason,
)
from llm_worker.fused_linear import LinearPart, fuse_projections
from llm_worker.kv_batch import KVBatch
from llm_worker.packed_linear import pack_linears


class _AlwaysPack:
    """A probe whose verdict is always "pack" (the tests need both paths)."""

    def known(self, model):
        return True

    def decide(self, model, toggle):
        return True


def _batch(model, lengths: list[int], seed: int = 0) -> tuple[KVBatch, torch.Tensor]:
    """Rows prefilled alone and batched as the engine batches them (left
    padding where lengths differ), and each row's first greedy token."""
    generator = torch.Generator().manual_seed(seed)
    kvs, first = [], []
    for n in lengths:
        ids = torch.randint(0, model.config.vocab_size, (1, n), generator=generator)
        out = model(input_ids=ids, use_cache=True)
        kvs.append(KVBatch.single(out.past_key_values))
        first.append(out.logits[:, -1:].argmax(-1))
    return KVBatch.concat(kvs), torch.cat(first)


def _decode(step, model, lengths: list[int], steps: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(each step's logits, the greedy tokens) of `steps` decode steps."""
    kv, token = _batch(model, lengths)
    logits, tokens = [], []
    for _ in range(steps):
        out = step(token, kv.lengths()[:, None], kv.cache, kv.step_mask())
        kv.grew()
        token = out.argmax(-1, keepdim=True)
        logits.append(out)
        tokens.append(token)
    return logits, torch.cat(tokens, dim=1)


def _assert_same(model, lengths: list[int], steps: int = 8) -> None:
    # SDPA's attention: the decode-attention kernel sums in its own order
    # (tests/test_decode_attention.py holds it to the forward).
    lean = decode_step_for(model, "auto", "sdpa")
    assert isinstance(lean, LeanDecode), unsupported_reason(model)
    with torch.inference_mode():
        want_logits, want = _decode(ModelDecode(model), model, lengths, steps)
        got_logits, got = _decode(lean, model, lengths, steps)
    assert torch.equal(got, want)
    for a, b in zip(got_logits, want_logits, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), (a - b).abs().max()


@pytest.fixture(scope="module")
def default_f32(default_model_dir):
    return AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()


@pytest.mark.parametrize(
    "lengths",
    [[37], [30, 30], [41, 23, 9]],
    ids=["one row", "unpadded rows", "padded rows"],
)
def test_lean_step_is_the_forward_bit_for_bit_on_the_default_model(default_f32, lengths):
    _assert_same(default_f32, lengths)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
def test_lean_step_runs_packed_linears_unchanged(default_model_dir):
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    assert pack_linears(model, "on", _AlwaysPack()) > 0
    _assert_same(model, [33, 12], steps=4)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_step_on_fused_packed_projections_as_the_worker_loads_them(default_model_dir, dtype):
    """The loader's layout: q/k/v and gate/up fused, then packed. The lean
    step calls the fused linears and the forward their parts: one weight,
    the same logits bit for bit."""
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=dtype).eval()
    layers = model.config.num_hidden_layers
    assert fuse_projections(model) == 2 * layers
    # Each layer: the two fused linears, o_proj and down_proj; and lm_head.
    assert pack_linears(model, "on", _AlwaysPack()) == 4 * layers + 1
    _assert_same(model, [33, 33] if dtype == torch.bfloat16 else [33, 12], steps=4)


def test_lean_step_on_fused_qwen2_biases_and_a_layer_left_apart():
    model = _tiny(_qwen2())
    # One layer's k_proj is not a plain nn.Linear: that layer's q/k/v stay
    # apart (the lean step concatenates their outputs), the rest are fused.
    odd = type("OddLinear", (torch.nn.Linear,), {})
    attn = model.model.layers[1].self_attn
    plain_k = attn.k_proj
    attn.k_proj = odd(plain_k.in_features, plain_k.out_features, bias=True)
    attn.k_proj.load_state_dict(plain_k.state_dict())
    assert fuse_projections(model) == 3
    assert isinstance(model.model.layers[0].self_attn.k_proj, LinearPart)
    assert type(attn.k_proj) is odd and not hasattr(attn, "qkv_proj")
    _assert_same(model, [20, 7, 13])
    mha = _tiny(_llama(num_key_value_heads=4))  # one group: [q | k | v] of equal widths
    assert fuse_projections(mha) == 4
    _assert_same(mha, [20, 7, 13])


@pytest.fixture(scope="module")
def default_bf16(default_model_dir):
    return AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.bfloat16).eval()


def test_lean_step_in_bfloat16_unpadded_rows(default_bf16):
    _assert_same(default_bf16, [29, 29], steps=4)


def test_lean_step_in_bfloat16_padded_rows_within_its_rounding(default_bf16):
    """Padded bf16 rows on CPU attend through SDPA's own GQA beside the mask
    (the forward packs query heads): the same math summed in another order.
    Fed the same tokens, every step's logits stay within bf16's rounding of
    the forward's; a mask or position wrong by one column is far outside."""
    model = default_bf16
    lean = decode_step_for(model, "auto", "sdpa")
    assert isinstance(lean, LeanDecode) and lean.gqa_with_mask
    assert_within_rounding(model, lean, BF16_LOGIT_SHARE)


def assert_within_rounding(
    model, lean, share: float, mean_share: float | None = None, same_greedy: bool = False
) -> None:
    """Padded rows (41, 23, 9 tokens) fed the same tokens for 6 steps: the
    lean step's logits within `share` of the largest of the forward's (and
    within `mean_share`, by default a sixth of that, on average), and, if
    asked, the same greedy picks."""
    mean_share = share / 6 if mean_share is None else mean_share
    with torch.inference_mode():
        theirs, token = _batch(model, [41, 23, 9])
        ours = theirs.select([0, 1, 2])  # a copy of the same cache
        for _ in range(6):
            want = ModelDecode(model)(
                token, theirs.lengths()[:, None], theirs.cache, theirs.step_mask()
            )
            got = lean(token, ours.lengths()[:, None], ours.cache, ours.step_mask())
            theirs.grew(), ours.grew()
            diff, scale = (got.float() - want.float()).abs(), float(want.float().abs().max())
            assert float(diff.max()) <= share * scale
            assert float(diff.mean()) <= mean_share * scale
            if same_greedy:
                assert torch.equal(got.argmax(-1), want.argmax(-1))
            token = want.argmax(-1, keepdim=True)


def _tiny(config) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def _llama(**overrides) -> LlamaConfig:
    fields = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    return LlamaConfig(**{**fields, **overrides})


def _qwen2(**overrides):
    from transformers import Qwen2Config

    fields = {k: v for k, v in _llama().to_diff_dict().items() if k != "model_type"}
    return Qwen2Config(**{**fields, **overrides})


def test_lean_step_on_qwen2_biases_and_on_plain_multi_head_attention():
    model = _tiny(_qwen2())
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    _assert_same(model, [20, 7, 13])
    _assert_same(_tiny(_llama(num_key_value_heads=4)), [20, 7, 13])  # one group
    _assert_same(_tiny(_llama(attention_bias=True, mlp_bias=True)), [11, 5])


@pytest.mark.parametrize(
    ("model", "reason"),
    [
        (lambda: _tiny(_llama(hidden_act="gelu")), "activation 'gelu'"),
        (lambda: _tiny(_gpt2()), "model type 'gpt2'"),
        (
            lambda: _tiny(_qwen2(use_sliding_window=True, max_window_layers=1)),
            "sliding-window layers",
        ),
    ],
    ids=["gelu llama", "gpt2", "sliding window"],
)
def test_other_models_keep_the_transformers_forward(model, reason):
    model = model()
    assert unsupported_reason(model) == reason
    assert isinstance(decode_step_for(model), ModelDecode)


def _gpt2():
    from transformers import GPT2Config

    return GPT2Config(vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_positions=256)


def test_the_flag_chooses_and_is_checked():
    model = _tiny(_llama())
    assert isinstance(decode_step_for(model, "auto"), LeanDecode)
    assert isinstance(decode_step_for(model, "transformers"), ModelDecode)
    with pytest.raises(ValueError, match="--decode-step must be one of auto, transformers"):
        decode_step_for(model, "fast")
    from llm_worker.config import WorkerConfig

    with pytest.raises(ValueError, match="--decode-step"):
        WorkerConfig(decode_step="fast")
    with pytest.raises(ValueError, match="--decode-attention must be one of auto, sdpa"):
        decode_step_for(model, "auto", "flash")
    with pytest.raises(ValueError, match="--decode-attention"):
        WorkerConfig(decode_attention="flash")
