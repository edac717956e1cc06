"""The lean decode step's attention on CPU: a C++ kernel
(llm_worker/kernels/decode_attention.cpp) built once per machine, or torch's
SDPA where the kernel does not build or apply.

One query per row is a shape torch's CPU SDPA serves poorly: on a 2-core
Xeon, 16 rows of SmolLM2 at ~340 real columns (~570 padded) took ~18 ms a
step in bf16 and ~32 ms in float32 over the 30 layers; the kernel took ~8 and
~14 ms, reading only each row's real columns and each kv head once for its
query heads (bench: bench/worker/decode_attention.py).

The kernel is built once per machine by llm_worker/cpp_kernel.py.
"""

from __future__ import annotations

from typing import Protocol

import torch

from llm_worker import cpp_kernel

SOURCE = cpp_kernel.KERNELS / "decode_attention.cpp"
HEAD_DIMS = (64, 128)
MAX_GROUP = 16  # query heads per kv head (kMaxGroup in the source)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class Kernel(Protocol):
    def __call__(
        self,
        q: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        starts: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """q [rows, heads, dim]; keys, values [rows, kv_heads, columns, dim];
        starts [rows] int64, each row's first real column. Returns [rows,
        heads, dim]."""


def load_kernel(cache_dir: str = "") -> Kernel | None:
    """The kernel, built on first use; None (and a logged reason) when it
    cannot be built or loaded here."""
    module = cpp_kernel.load(SOURCE, cache_dir)
    return None if module is None else module.decode_attention


def unsupported_reason(weight: torch.Tensor, head_dim: int, groups: int) -> str:
    """Why the kernel does not apply to this model ("" when it does)."""
    if weight.device.type != "cpu":
        return f"device {weight.device.type}"
    if weight.dtype not in DTYPES:
        return f"dtype {weight.dtype}"
    if head_dim not in HEAD_DIMS:
        return f"head dim {head_dim}"
    if groups > MAX_GROUP:
        return f"{groups} query heads per kv head"
    return ""


def row_starts(mask: torch.Tensor | None, rows: int) -> torch.Tensor | None:
    """Each row's first real column, from a step's padding mask [rows,
    columns] (1 = real); zeros when nothing is padded. None when the mask is
    not left padding (a real column after a padded one), which the kernel
    cannot skip: the caller masks through SDPA then."""
    if mask is None:
        return torch.zeros(rows, dtype=torch.long)
    seen = mask.bool()
    columns = seen.shape[1]
    starts = columns - seen.sum(-1)
    left_padded = torch.arange(columns, device=mask.device)[None, :] >= starts[:, None]
    if not torch.equal(seen, left_padded) or bool((starts >= columns).any()):
        return None
    return starts.to(device="cpu", dtype=torch.long).contiguous()
