"""Linears on CPU with their weights packed once for oneDNN.

`nn.Linear` hands its plain weight to a BLAS or oneDNN call that reorders
or streams it in a layout of its own on each of the ~210 calls a decode step
makes. Packed once at load (`mkldnn._reorder_linear_weight`, the layout
inductor's freezing uses), the same math skips that work. What it buys
depends on the CPU, so `--pack-linears auto` decides per dtype:

- bfloat16 on CPUs with native bf16: always packed (2-core Xeon with
  AVX512-BF16: decode steps ×1.32 at 1 row, ×1.14 at 4, ×0.99 at 16).
- float32: packed only where a probe on the model itself measures it faster
  (`linear_probe.py`): ×1.1–1.2 at 1 row and ×1.4–1.7 at 4–16 rows on a
  2-core AMD EPYC (Zen 3, AVX2), where MKL's sgemv streams weights at ~7 GB/s
  of a measured ~19; it measured slower on a Xeon.

`on` packs both dtypes unconditionally, `off` leaves every linear alone.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import structlog
import torch

from llm_worker.config import PACK_MODES

log = structlog.get_logger("loader")

# oneDNN picks its blocked layout for this many rows; measured: bf16 at 1
# (the Xeon above), float32 at 16 (×1.44 over a hint of 1 at 4 rows on the
# EPYC, and as fast at 1 row; prefill unchanged).
BATCH_HINT = {torch.bfloat16: 1, torch.float32: 16}

Toggle = Callable[[bool], None]  # True: the packed linears are in the model
Decide = Callable[[Toggle], bool]  # measures both ways; True keeps them packed


class PackedLinear(torch.nn.Module):
    """`nn.Linear`'s forward on a weight packed for oneDNN (bias kept)."""

    def __init__(self, linear: torch.nn.Linear, batch_hint: int = 1):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        # A copy in oneDNN's layout; a tied weight (lm_head) keeps its embedding.
        self.register_buffer(
            "packed", torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint), persistent=False
        )
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        out = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none", [], "")
        return out.reshape(*x.shape[:-1], self.out_features)


@dataclass(eq=False)  # compared by identity
class _Swap:
    """One linear of the model and its packed copy; `use` installs either."""

    parent: torch.nn.Module
    name: str
    plain: torch.nn.Linear
    packed: PackedLinear

    def use(self, packed: bool) -> None:
        setattr(self.parent, self.name, self.packed if packed else self.plain)


def _ops_available() -> bool:
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def _packable(module: torch.nn.Module, dtypes: set[torch.dtype]) -> bool:
    """A plain `nn.Linear` on CPU of one of these dtypes (each layer is
    checked: a model may keep some layers in another dtype)."""
    return (
        type(module) is torch.nn.Linear
        and module.weight.dtype in dtypes
        and module.weight.device.type == "cpu"
    )


def _dtypes(mode: str) -> set[torch.dtype]:
    """The dtypes this mode may pack on this CPU."""
    from llm_worker.loader import cpu_has_native_bf16  # loader imports this module

    if mode == "off" or not _ops_available():
        return set()
    if mode == "on" or cpu_has_native_bf16():
        return {torch.float32, torch.bfloat16}
    return {torch.float32}  # emulated bf16 is not worth packing


def can_pack(model: torch.nn.Module, mode: str = "auto") -> bool:
    """Whether `pack_linears` would consider any of this model's linears."""
    dtypes = _dtypes(mode)
    return bool(dtypes) and any(_packable(m, dtypes) for m in model.modules())


def _available_memory() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not on this platform: assume plenty
        return 1 << 62


def pack_linears(model: torch.nn.Module, mode: str = "auto", decide: Decide | None = None) -> int:
    """Replaces the model's CPU linears with PackedLinears where `mode` says
    (see the module's docstring), in place; returns how many. In `auto`,
    float32 linears are packed only when `decide` (given a toggle between
    the two) says it pays; without one they stay plain."""
    if mode not in PACK_MODES:
        raise ValueError(f"pack mode must be one of {', '.join(PACK_MODES)}, not {mode!r}")
    dtypes = _dtypes(mode)
    if mode == "auto" and torch.float32 in dtypes:
        f32_bytes = sum(m.weight.nbytes for m in model.modules() if _packable(m, {torch.float32}))
        # Deciding holds both copies at once; a model that would not fit twice stays plain.
        if decide is None or 2 * f32_bytes > _available_memory():
            dtypes.discard(torch.float32)
    swaps = [
        _Swap(parent, name, child, PackedLinear(child, BATCH_HINT[child.weight.dtype]))
        for parent in list(model.modules())
        for name, child in list(parent.named_children())
        if _packable(child, dtypes)
    ]
    for swap in swaps:
        swap.use(True)
    probed = [s for s in swaps if s.plain.weight.dtype == torch.float32]
    if mode == "auto" and probed:

        def toggle(packed: bool) -> None:
            for swap in probed:
                swap.use(packed)

        assert decide is not None  # float32 is only left in dtypes with a decider
        keep = decide(toggle)
        toggle(keep)
        if not keep:
            swaps = [s for s in swaps if s not in probed]
    if swaps:
        kinds = sorted({str(s.plain.weight.dtype).removeprefix("torch.") for s in swaps})
        log.info("linears packed for oneDNN", linears=len(swaps), dtypes=kinds)
    return len(swaps)
