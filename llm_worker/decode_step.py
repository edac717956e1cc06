"""One decode step of the running batch: one new token per row in, each
row's next-token logits out. Two implementations behind one signature:

- `ModelDecode`: the transformers forward, `model(input_ids=..., ...)`; any
  model transformers runs.
- `LeanDecode`: the same math for Llama-family models as a plain loop of
  torch ops; `--decode-step auto` (the default) takes it where it applies.

At one token per row transformers' forward pays, besides the matrix math,
for module calls, keyword plumbing, output records and a mask built per
step: on a 2-core Xeon, SmolLM2-135M in float32 at a 300-token context, a
step took ~15 % less time on the lean loop. `LeanDecode` runs the same math
(the model's own weights and linears, packed or not, its rotary embedding
and its cache layers) as one loop over the layers, op for op what the
forward computes: the same RMSNorm, RoPE, SDPA and MLP in the same order and
dtypes, so its logits are the forward's bit for bit (tests/test_decode_step.py);
the one exception, padded bf16 rows on CPU, is `gqa_with_mask` below.

On CPU its attention is, by default, a kernel of our own instead of SDPA
(`--decode-attention`, llm_worker/decode_attention.py): same math, summed in
another order, so those logits match the forward's to float rounding, not bit
for bit (tests/test_decode_attention.py).

Where the loader fused a layer's q/k/v and gate/up (llm_worker/fused_linear.py)
the step calls the fused linears; the forward reads the same weights.

Only decode steps take this path; prefills (many tokens, causal masks,
chunks) stay on the transformers forward, and so does every model whose
layers `unsupported_reason` does not know to be plain Llama layers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import structlog
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from llm_worker import decode_attention
from llm_worker.config import (
    DECODE_ATTENTIONS,
    DECODE_STEPS,
    check_decode_attention,
    check_decode_step,
)
from llm_worker.decode_attention import Kernel
from llm_worker.fused_linear import FUSIONS, fused_of

log = structlog.get_logger("engine")

# How far padded bf16 rows on CPU (see LeanDecode.gqa_with_mask) may stray
# from the forward's logits: a share of the largest logit (about 7 bf16 steps
# at the logits' scale; a mask or position off by a column is far beyond it).
BF16_LOGIT_SHARE = 0.03

# Model types whose decoder layers are Llama's: pre-norm RMSNorm, rotary
# q/k, grouped-query SDPA, SiLU-gated MLP (Qwen2 adds q/k/v biases, which
# the model's own linears apply).
LEAN_MODEL_TYPES = ("llama", "qwen2")


class DecodeStep(Protocol):
    def __call__(
        self,
        tokens: torch.Tensor,
        position_ids: torch.Tensor,
        cache: DynamicCache,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """tokens, position_ids: [rows, 1]; mask: [rows, columns + 1] (1 = a
        real token) or None when no row is padded. Appends each layer's key
        and value to `cache` and returns the logits [rows, vocab]."""


class ModelDecode:
    """The transformers forward as a decode step."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def __call__(self, tokens, position_ids, cache, mask) -> torch.Tensor:
        out = self.model(
            input_ids=tokens,
            attention_mask=mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )
        return out.logits[:, -1]


Projection = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class _Layer:
    """One decoder layer's parts, looked up once."""

    attn_norm: torch.Tensor
    qkv: Projection  # [q | k | v] along the last axis
    o: torch.nn.Module
    mlp_norm: torch.Tensor
    gate_up: Projection  # [gate | up]
    down: torch.nn.Module


def _projection(owner: torch.nn.Module, fused_name: str, names: tuple[str, ...]) -> Projection:
    """The layer's fused linear (llm_worker/fused_linear.py), or, where its
    parts were left apart, their outputs concatenated: the same floats."""
    fused = fused_of(owner, fused_name)
    if fused is not None:
        return fused
    parts = [getattr(owner, n) for n in names]
    return lambda x: torch.cat([p(x) for p in parts], dim=-1)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm's arithmetic, op for op (in float32, back to x's dtype).
    On CPU torch's rms_norm gives the same floats as its float32 ops in one
    (tests/test_decode_step.py checks the logits bit for bit)."""
    if x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    h = x.to(torch.float32)
    if x.device.type == "cpu":  # the same floats again, one op for four
        h = F.rms_norm(h, (h.shape[-1],), None, eps)
    else:
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """apply_rotary_pos_emb's arithmetic on heads: x·cos + rotate_half(x)·sin,
    with rotate_half's negation moved onto sin (`_signed`): -a·b and a·-b
    are the same float, and the step negates one small tensor, not two."""
    half = x.shape[-1] // 2
    rotated = torch.cat((x[..., half:], x[..., :half]), dim=-1).mul_(signed_sin)
    return (x * cos).add_(rotated)


def _signed(sin: torch.Tensor) -> torch.Tensor:
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def unsupported_reason(model: torch.nn.Module) -> str:
    """Why this model cannot take the lean path ("" when it can)."""
    config = model.config
    if config.model_type not in LEAN_MODEL_TYPES:
        return f"model type {config.model_type!r}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r}"
    if getattr(config, "use_sliding_window", False) or any(
        t != "full_attention" for t in (getattr(config, "layer_types", None) or [])
    ):
        return "sliding-window layers"
    if getattr(config, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
        return f"attention {config._attn_implementation!r}"
    devices = {p.device for p in model.parameters()} | {b.device for b in model.buffers()}
    if len(devices) != 1:
        return "weights on several devices"
    inner = getattr(model, "model", None)
    if not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return "unknown module layout"
    return ""


class LeanDecode:
    """`ModelDecode`'s logits, bit for bit (but see `gqa_with_mask`), from a
    loop over the layers."""

    def __init__(self, model: torch.nn.Module, kernel: Kernel | None = None):
        inner = model.model
        self.kernel = kernel  # the CPU decode-attention kernel, or None: SDPA
        config = model.config
        self.embed = inner.embed_tokens
        self.rotary = inner.rotary_emb
        self.final_norm = inner.norm.weight
        self.lm_head = model.lm_head
        self.eps = float(config.rms_norm_eps)
        first = inner.layers[0].self_attn
        self.head_dim = int(first.head_dim)
        self.groups = int(first.num_key_value_groups)
        self.heads = int(config.num_attention_heads)
        self.scale = float(first.scaling)
        # Padded rows in bfloat16 on CPU: SDPA's own GQA beside the mask, not
        # the forward's query heads packed per key/value head. At 16 rows of
        # ~600 columns its flash kernel took 17 ms a step over the 30 layers
        # against 26 ms packed (float32: no gain, so it keeps the forward's
        # way). Its sums run in another order, so these logits differ from the
        # forward's at bfloat16's rounding (tests/test_decode_step.py bounds it).
        weight = self.embed.weight
        self.gqa_with_mask = weight.device.type == "cpu" and weight.dtype == torch.bfloat16
        # Widths of [q | k] in the fused q/k/v output and of gate in [gate | up].
        self.qk_width = (self.heads + self.heads // self.groups) * self.head_dim
        self.intermediate = int(config.intermediate_size)
        (attn, qkv, qkv_parts), (mlp, gate_up, gate_up_parts) = FUSIONS
        self.layers = [
            _Layer(
                layer.input_layernorm.weight,
                _projection(getattr(layer, attn), qkv, qkv_parts),
                layer.self_attn.o_proj,
                layer.post_attention_layernorm.weight,
                _projection(getattr(layer, mlp), gate_up, gate_up_parts),
                layer.mlp.down_proj,
            )
            for layer in inner.layers
        ]

    def __call__(self, tokens, position_ids, cache, mask) -> torch.Tensor:
        rows, d = tokens.shape[0], self.head_dim
        h = self.embed(tokens)
        cos, sin = self.rotary(h, position_ids)
        cos, sin = cos.unsqueeze(1), _signed(sin.unsqueeze(1))  # over the heads axis
        # What transformers' sdpa_mask makes of a padding mask at one query,
        # as the additive mask SDPA would turn that bool mask into in every
        # layer (0 where seen, -inf where not, in the query's dtype): once a step.
        attn_mask = None
        starts = None
        if self.kernel is not None:
            starts = decode_attention.row_starts(mask, rows)
        if mask is not None and starts is None:
            seen = mask.bool()[:, None, None, :]
            attn_mask = torch.zeros(seen.shape, dtype=h.dtype, device=h.device).masked_fill_(
                ~seen, float("-inf")
            )
        for part, kv in zip(self.layers, cache.layers, strict=True):
            x = _rms_norm(h, part.attn_norm, self.eps)
            qkv = part.qkv(x)
            # q's and k's heads rotated as one tensor: half the small ops.
            qk = qkv[..., : self.qk_width].view(rows, 1, -1, d).transpose(1, 2)
            qk = _rope(qk, cos, sin)
            q, k = qk[:, : self.heads], qk[:, self.heads :]
            v = qkv[..., self.qk_width :].view(rows, 1, -1, d).transpose(1, 2)
            keys, values = kv.update(k, v)
            if starts is not None:
                out = self.kernel(q[:, :, 0], keys, values, starts, self.scale)
            else:
                out = self._attend(q, keys, values, attn_mask)
            h = h + part.o(out.view(rows, 1, -1))
            x = _rms_norm(h, part.mlp_norm, self.eps)
            gate, up = part.gate_up(x).split(self.intermediate, dim=-1)
            # In place where a fresh tensor would only be freed again (the same floats).
            gated = F.silu(gate).mul_(up)
            h = h.add_(part.down(gated))
        return self.lm_head(_rms_norm(h, self.final_norm, self.eps))[:, -1]

    def _attend(self, q, keys, values, attn_mask) -> torch.Tensor:
        """sdpa_attention_forward at one query: GQA in SDPA without a mask;
        with one, the query heads of each key/value head as its queries
        (`pack_gqa`). Returns [rows, 1, heads, head_dim]."""
        rows, heads, _, d = q.shape
        if self.groups == 1:
            out = F.scaled_dot_product_attention(
                q, keys, values, attn_mask=attn_mask, scale=self.scale
            )
        elif attn_mask is None or self.gqa_with_mask:
            out = F.scaled_dot_product_attention(
                q, keys, values, attn_mask=attn_mask, scale=self.scale, enable_gqa=True
            )
        else:
            packed = q.reshape(rows, heads // self.groups, self.groups, d)
            out = F.scaled_dot_product_attention(
                packed, keys, values, attn_mask=attn_mask, scale=self.scale
            )
        return out.reshape(rows, heads, 1, d).transpose(1, 2).contiguous()


def decode_step_for(
    model: torch.nn.Module,
    mode: str = DECODE_STEPS[0],
    attention: str = DECODE_ATTENTIONS[0],
    cache_dir: str = "",
) -> DecodeStep:
    """`--decode-step`: `auto` takes the lean step where the model allows it,
    `transformers` always the transformers forward. `--decode-attention`:
    `auto` gives the lean step the CPU kernel where it builds and applies,
    `sdpa` keeps torch's SDPA."""
    check_decode_step(mode)
    check_decode_attention(attention)
    why = "--decode-step transformers" if mode == "transformers" else unsupported_reason(model)
    if why:
        log.info("decode steps on the transformers forward", reason=why)
        return ModelDecode(model)
    kernel = None
    first = model.model.layers[0].self_attn
    why = (
        "--decode-attention sdpa"
        if attention == "sdpa"
        else decode_attention.unsupported_reason(
            model.model.embed_tokens.weight, int(first.head_dim), int(first.num_key_value_groups)
        )
    )
    if not why:
        kernel = decode_attention.load_kernel(cache_dir)
        why = "" if kernel is not None else "the kernel did not build"
    log.info(
        "decode steps on the lean Llama loop",
        model_type=model.config.model_type,
        attention="kernel" if kernel is not None else "sdpa",
        **({"reason": why} if why else {}),
    )
    return LeanDecode(model, kernel)
