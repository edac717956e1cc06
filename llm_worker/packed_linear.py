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
  of a measured ~19; on a Xeon it measured slower (with a batch hint of 1).

`on` packs both dtypes unconditionally, `off` leaves every linear alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import structlog
import torch

from llm_worker.config import PACK_MODES

log = structlog.get_logger("loader")

# oneDNN picks its blocked layout for this many rows; measured: bf16 at 1
# (the Xeon above), float32 at 16 (×1.44 over a hint of 1 at 4 rows on the
# EPYC, and as fast at 1 row; prefill unchanged).
BATCH_HINT = {torch.bfloat16: 1, torch.float32: 16}

Toggle = Callable[[bool], None]  # True: the packed linears are in the model


class Probe(Protocol):
    """Judges float32 packing for `auto` (`linear_probe.Verdicts`)."""

    def known(self, model: torch.nn.Module) -> bool | None:
        """A verdict already reached for this model (plain), or None."""

    def decide(self, model: torch.nn.Module, toggle: Toggle) -> bool:
        """Measures both ways through `toggle`; True keeps them packed."""


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
    """Whether `pack_linears` would consider any of this model's linears (in
    `auto`, float32 ones are then packed only on the probe's verdict)."""
    dtypes = _dtypes(mode)
    return bool(dtypes) and any(_packable(m, dtypes) for m in model.modules())


def _available_memory() -> int:
    """Bytes this process may still allocate: the kernel's MemAvailable, and
    no more than its cgroup's limit leaves (a container's limit, not the host's)."""
    available = 1 << 62  # unknown: no limit we can see
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    with contextlib.suppress(OSError, ValueError):
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            available = min(available, int(limit) - used)
    return available


def _room_to_probe(model: torch.nn.Module) -> bool:
    """Probing holds a packed copy of every float32 weight beside the plain one."""
    need = sum(m.weight.nbytes for m in model.modules() if _packable(m, {torch.float32}))
    room = _available_memory()
    if need * 1.25 > room:
        log.info(
            "float32 linears left plain: no room to probe packing",
            need_mib=need >> 20,
            available_mib=max(room, 0) >> 20,
        )
        return False
    return True


def pack_linears(model: torch.nn.Module, mode: str = "auto", probe: Probe | None = None) -> int:
    """Replaces the model's CPU linears with PackedLinears where `mode` says
    (see the module's docstring), in place; returns how many. In `auto`,
    float32 linears are packed only on `probe`'s verdict (a stored one, or
    one it measures); without a probe, or when probing fails, they stay plain."""
    if mode not in PACK_MODES:
        raise ValueError(f"pack mode must be one of {', '.join(PACK_MODES)}, not {mode!r}")
    dtypes = _dtypes(mode)
    if not any(_packable(m, dtypes) for m in model.modules()):
        return 0  # e.g. every linear on the decode-linear kernel (decode_linear.py)
    measure = False
    if mode == "auto" and torch.float32 in dtypes:
        verdict = probe.known(model) if probe is not None else False
        measure = verdict is None and _room_to_probe(model)
        if not (verdict or measure):
            dtypes.discard(torch.float32)
    swaps = [
        _Swap(parent, name, child, PackedLinear(child, BATCH_HINT[child.weight.dtype]))
        for parent in list(model.modules())
        for name, child in list(parent.named_children())
        if _packable(child, dtypes)
    ]
    for swap in swaps:
        swap.use(True)
    probed = [s for s in swaps if s.plain.weight.dtype == torch.float32] if measure else []
    if probed:

        def toggle(packed: bool) -> None:
            for swap in probed:
                swap.use(packed)

        assert probe is not None  # measure is only set with a probe
        try:
            keep = bool(probe.decide(model, toggle))
        except Exception as e:  # an optional speed-up: never a failed start
            log.warning("float32 packing probe failed; float32 linears stay plain", error=repr(e))
            keep = False
        toggle(keep)
        if not keep:
            swaps = [s for s in swaps if s not in probed]
    if swaps:
        kinds = sorted({str(s.plain.weight.dtype).removeprefix("torch.") for s in swaps})
        log.info("linears packed for oneDNN", linears=len(swaps), dtypes=kinds)
    return len(swaps)
