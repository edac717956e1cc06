"""The running batch's KV cache: every sequence's keys and values, left-padded
to one length, so one forward pass decodes a step of all of them.

Sequences join and leave between decode steps. This is the continuous
batching of text-generation-inference's Python `CausalLMBatch`: a joining
sequence (prefilled on its own) is concatenated in with left padding, a
finished one is filtered out, and columns that are padding in every row are
trimmed away. The attention mask marks padding, and each row keeps its own
position ids, so a row computes exactly what it would alone.

Rows live in a transformers `DynamicCache` kept across steps (its layers
grow by one column per step); only membership changes rebuild it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def supports_batching(cache: DynamicCache) -> bool:
    """Padding and slicing along the sequence axis are only sound for plain
    full-attention layers (not sliding windows, not recurrent state)."""
    return all(type(layer) is DynamicLayer for layer in cache.layers)


@dataclass
class KVBatch:
    cache: DynamicCache
    mask: torch.Tensor  # [rows, columns], 1 where a column holds a real token
    config: object  # the model config, for rebuilding caches
    padded: bool = field(init=False, default=False)  # any row left-padded; steps add none

    def __post_init__(self) -> None:
        self.padded = bool((self.mask == 0).any())

    @classmethod
    def single(cls, cache: DynamicCache, config) -> KVBatch:
        """One freshly prefilled sequence: every column is real."""
        n = cache.get_seq_length()
        device = cache.layers[0].keys.device
        return cls(cache, torch.ones((1, n), dtype=torch.long, device=device), config)

    @property
    def rows(self) -> int:
        return int(self.mask.shape[0])

    @property
    def columns(self) -> int:
        return int(self.mask.shape[1])

    def lengths(self) -> torch.Tensor:
        """Real tokens per row: also each row's next position id."""
        return self.mask.sum(dim=1)

    def step_mask(self) -> torch.Tensor | None:
        """The attention mask for a forward pass that adds one column; None
        when no row is padded (the model's faster unmasked causal path)."""
        return self._grown() if self.padded else None

    def _grown(self) -> torch.Tensor:
        return torch.cat([self.mask, self.mask.new_ones((self.rows, 1))], dim=1)

    def grew(self) -> None:
        """Records that a forward pass appended one column to every row."""
        self.mask = self._grown()

    def _tensors(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(layer.keys, layer.values) for layer in self.cache.layers]

    def select(self, rows: Sequence[int]) -> KVBatch | None:
        """Keeps these rows (None when none is left) and trims the columns
        that became padding in every remaining row."""
        if not rows:
            return None
        index = torch.tensor(list(rows), device=self.mask.device)
        mask = self.mask.index_select(0, index)
        # Rows are left-padded: the first column any row uses is where real data starts.
        start = int((mask.sum(dim=0) > 0).int().argmax()) if mask.any() else mask.shape[1]
        kv = [
            (k.index_select(0, index)[:, :, start:], v.index_select(0, index)[:, :, start:])
            for k, v in self._tensors()
        ]
        return KVBatch(
            DynamicCache(kv, config=self.config), mask[:, start:].contiguous(), self.config
        )

    def row_prefix(self, row: int, tokens: int) -> KVBatch:
        """The first `tokens` real tokens of one row, unpadded (for the prefix cache)."""
        start = self.columns - int(self.mask[row].sum())
        kv = [
            (
                k[row : row + 1, :, start : start + tokens],
                v[row : row + 1, :, start : start + tokens],
            )
            for k, v in self._tensors()
        ]
        mask = self.mask.new_ones((1, tokens))
        return KVBatch(DynamicCache(kv, config=self.config), mask, self.config)

    def copy_prefix(self, tokens: int) -> DynamicCache:
        """A cache of this single-row batch's first `tokens` tokens, to prefill
        the rest of a prompt on. DynamicCache copies what it is given, so the
        stored entry stays intact as the new cache grows."""
        kv = [(k[:, :, :tokens], v[:, :, :tokens]) for k, v in self._tensors()]
        return DynamicCache(kv, config=self.config)

    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self._tensors())

    @staticmethod
    def concat(batches: Sequence[KVBatch]) -> KVBatch:
        """Stacks batches into one, left-padding each to the longest."""
        if len(batches) == 1:
            return batches[0]
        width = max(b.columns for b in batches)
        masks, per_layer = [], [([], []) for _ in batches[0].cache.layers]
        for b in batches:
            pad = width - b.columns
            masks.append(torch.nn.functional.pad(b.mask, (pad, 0)))
            for (keys, values), (k, v) in zip(per_layer, b._tensors(), strict=True):
                # Pads dim -2 (the sequence axis) on the left.
                keys.append(torch.nn.functional.pad(k, (0, 0, pad, 0)))
                values.append(torch.nn.functional.pad(v, (0, 0, pad, 0)))
        kv = [(torch.cat(k), torch.cat(v)) for k, v in per_layer]
        config = batches[0].config
        return KVBatch(DynamicCache(kv, config=config), torch.cat(masks), config)
