"""Linears on CPU at decode batch sizes through a C++ kernel
(llm_worker/kernels/decode_linear.cpp), on the model's own plain weights.

At one to a few rows a linear is one pass over its weight, so a decode step
is bound by how fast its weights stream. torch's CPU paths (MKL's sgemv,
oneDNN's small gemms, packed or not) streamed them at a third to a half of
what a plain sum reads on the 2-core machines this runs on (README, issue
14); the kernel walks each thread's contiguous run of weight rows once.

`--decode-linear auto` (the default) swaps, on CPUs with AVX-512 (where it
was measured; `cpu_has_avx512`), each CPU `nn.Linear` of a supported dtype
for a `KernelLinear` at load, before packing
(llm_worker/packed_linear.py leaves these alone: one copy of each weight).
A `KernelLinear` sends inputs of up to `MAX_ROWS` rows (decode steps) to the
kernel and larger ones (prefills, where the matrix math is compute-bound and
torch's gemm is good) to `F.linear` on the same weight. `torch` keeps
torch's linears (and packing) everywhere. Results match torch's linear to
float rounding (sums in float32 in another order), not bit for bit.
"""

from __future__ import annotations

from typing import Protocol

import structlog
import torch
import torch.nn.functional as F

from llm_worker import cpp_kernel
from llm_worker.config import check_decode_linear

log = structlog.get_logger("loader")

SOURCE = cpp_kernel.KERNELS / "decode_linear.cpp"
DTYPES = (torch.float32, torch.bfloat16)
MAX_ROWS = 16  # more rows than this go to F.linear (measured: bench/worker/decode_linear.py)
IN_MULTIPLE = 16  # the kernel's vectors: in_features must be a multiple


class Kernel(Protocol):
    def __call__(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """x [rows, in]; weight [out, in] contiguous; bias [out] or None; one
        dtype. Returns [rows, out]."""


def load_kernel(cache_dir: str = "") -> Kernel | None:
    """The kernel, built on first use; None (and a logged reason) when it
    cannot be built or loaded here."""
    module = cpp_kernel.load(SOURCE, cache_dir)
    return None if module is None else module.decode_linear


class KernelLinear(torch.nn.Module):
    """`nn.Linear`'s forward with few-row inputs on the kernel. Holds the
    linear's own weight and bias (no copy)."""

    def __init__(self, linear: torch.nn.Linear, kernel: Kernel, max_rows: int = MAX_ROWS):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.kernel, self.max_rows = kernel, max_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        # The kernel records no gradient: where autograd would, torch serves.
        wants_grad = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        if rows > self.max_rows or wants_grad:
            return F.linear(x, self.weight, self.bias)
        out = self.kernel(x.reshape(rows, self.in_features), self.weight, self.bias)
        return out.reshape(*x.shape[:-1], self.out_features)


def cpu_has_avx512() -> bool:
    """The kernel's tiles hold 16 + 5 vectors of 16 floats: 21 of AVX-512's
    32 registers. With AVX2's 16 registers of half the width they would
    spill, and it was measured only on AVX-512 CPUs (Zen 4), so elsewhere
    torch's linears serve."""
    try:  # the same probes as loader.cpu_has_native_bf16
        return bool(torch.cpu._is_avx512_supported())
    except AttributeError:  # a torch without the probe: assume not
        return False


def _servable(module: torch.nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (
        type(module) is torch.nn.Linear
        and weight is not None
        and weight.device.type == "cpu"
        and weight.dtype in DTYPES
        and weight.is_contiguous()
        and module.in_features % IN_MULTIPLE == 0
        and (module.bias is None or module.bias.dtype == weight.dtype)
    )


def use_decode_linears(model: torch.nn.Module, mode: str = "auto", cache_dir: str = "") -> int:
    """`--decode-linear`: in `auto`, replaces the model's CPU linears that the
    kernel serves with `KernelLinear`s, in place; returns how many (0 with
    `torch`, on GPU, or where the kernel does not build)."""
    check_decode_linear(mode)
    if mode == "torch":
        return 0
    targets = [
        (parent, name, child)
        for parent in list(model.modules())
        for name, child in list(parent.named_children())
        if _servable(child)
    ]
    if not targets:  # e.g. a model on a GPU
        return 0
    if not cpu_has_avx512():
        log.info("linears stay on torch: the decode-linear kernel is tuned for AVX-512 CPUs")
        return 0
    kernel = load_kernel(cache_dir)
    if kernel is None:
        return 0
    for parent, name, child in targets:
        setattr(parent, name, KernelLinear(child, kernel))
    log.info("linears on the decode-linear kernel", linears=len(targets), max_rows=MAX_ROWS)
    return len(targets)
