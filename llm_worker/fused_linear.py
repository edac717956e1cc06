"""Projections that read the same input, fused into one linear.

In a Llama layer q_proj, k_proj and v_proj all read the normed hidden state,
and the MLP's gate_proj and up_proj read the same input as each other. At decode each
linear is a matrix-vector product, bound by reading its weight, and each is
its own call: a dispatch, an OpenMP fork and join, one more read of the
input. A single linear over the concatenated weights makes one call where
there were three (or two), with the same floats out, because each output is
still one row of the weight times the input. Measured on a 2-core AMD EPYC (Zen 4) in
bfloat16 with packed linears: decode steps ×1.13 faster at 1 row, ×1.10 at
16 rows (`bench/worker/decode_step.py` compares the two in one run).

The fused weight is the only copy. The model's own q_proj, k_proj and v_proj
(and gate_proj, up_proj) become `LinearPart`s, each a slice of the fused output, so
transformers' forward (prefills) reads the same weights as the lean decode
step (`decode_step.py`), which calls the fused linear itself. For the forward,
the fused product is computed once for each input and handed out part by part
(`FusedLinear.take`). The fused linear is an `nn.Linear`, so
`packed_linear.pack_linears` packs it like any other linear.
"""

from __future__ import annotations

import functools

import structlog
import torch

log = structlog.get_logger("loader")

# (the module, its fused linear's name, the parts it replaces, in output order)
FUSIONS = (
    ("self_attn", "qkv_proj", ("q_proj", "k_proj", "v_proj")),
    ("mlp", "gate_up_proj", ("gate_proj", "up_proj")),
)


class FusedLinear(torch.nn.Module):
    """One linear over the concatenated weights (and biases) of `linears`,
    which all read the same input; `sizes` are their output widths."""

    def __init__(self, linears: list[torch.nn.Linear]):
        super().__init__()
        first = linears[0]
        weight = torch.cat([p.weight.detach() for p in linears])
        with_bias = first.bias is not None
        self.linear = torch.nn.Linear(
            first.in_features, weight.shape[0], bias=with_bias, device="meta", dtype=weight.dtype
        )
        self.linear.weight = torch.nn.Parameter(weight, requires_grad=False)
        if with_bias:
            bias = torch.cat([p.bias.detach() for p in linears])
            self.linear.bias = torch.nn.Parameter(bias, requires_grad=False)
        self.sizes = [p.out_features for p in linears]
        # The last fused output handed out by `take`: (its input, its parts,
        # the parts not taken yet).
        self._pending: tuple[torch.Tensor, tuple[torch.Tensor, ...], set[int]] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)

    def take(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Part `index` of this linear's output on `x`. The forward calls each
        part on the same input tensor in turn: the first call computes the fused
        output, and the others take their slices of it. Once every part has
        been taken it is dropped, and another input, or a part asked for
        twice, computes afresh. The input is matched by identity (an inference
        tensor has no version counter): the forward never writes to the
        normed input between its projections."""
        pending = self._pending
        if pending is None or pending[0] is not x or index not in pending[2]:
            parts = self(x).split(self.sizes, dim=-1)
            pending = (x, parts, set(range(len(self.sizes))))
        pending[2].discard(index)
        self._pending = pending if pending[2] else None
        return pending[1][index]


class LinearPart(torch.nn.Module):
    """What was one of the fused linears: its slice of the fused output."""

    def __init__(self, fused: FusedLinear, index: int, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        # A bound method, not a submodule: the fused linear is registered once,
        # beside its parts, and packed or counted once.
        self._take = functools.partial(fused.take, index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._take(x)


def _fusable(linears: list[torch.nn.Module]) -> bool:
    """Plain linears on one device and dtype, of one input width, all with
    biases or all without."""
    if not all(type(p) is torch.nn.Linear for p in linears):
        return False
    first = linears[0]
    return all(
        p.in_features == first.in_features
        and p.weight.dtype == first.weight.dtype
        and p.weight.device == first.weight.device
        and (p.bias is None) == (first.bias is None)
        for p in linears
    )


def fuse_projections(model: torch.nn.Module) -> int:
    """Fuses q/k/v and gate/up in each of a Llama-style model's layers, in
    place; returns how many fused linears it made. It fuses only layers whose
    parts are all plain, alike linears, and leaves any others as they are."""
    fused = 0
    for layer in model.model.layers:
        for owner_name, fused_name, names in FUSIONS:
            owner = getattr(layer, owner_name)
            linears = [getattr(owner, n) for n in names]
            if not _fusable(linears):
                continue
            joint = FusedLinear(linears)
            setattr(owner, fused_name, joint)
            for index, (name, part) in enumerate(zip(names, linears, strict=True)):
                setattr(owner, name, LinearPart(joint, index, part.in_features, part.out_features))
            fused += 1
    if fused:
        log.info("projections fused", linears=fused)
    return fused


def fused_of(owner: torch.nn.Module, fused_name: str) -> FusedLinear | None:
    """The layer module's fused linear, or None where its parts were left apart."""
    joint = getattr(owner, fused_name, None)
    return joint if isinstance(joint, FusedLinear) else None
