"""The running batch's KV cache: every sequence's keys and values, left-padded
to one length, so one forward pass decodes a step of all of them.

Sequences join and leave between decode steps. This is the continuous
batching of text-generation-inference's Python `CausalLMBatch`: a joining
sequence (prefilled on its own) is concatenated in with left padding, a
finished one is filtered out, and columns that are padding in every row are
trimmed away. The attention mask marks padding, and each row keeps its own
position ids, so a row computes exactly what it would alone.

Rows live in a transformers `DynamicCache` kept across steps; only
membership changes rebuild it. Its layers are `GrowingLayer`s: a plain
`DynamicLayer` concatenates its whole history on every step, which at a
2000-token context and 8 rows cost a fifth of each decode step on CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class GrowingLayer(DynamicLayer):
    """A full-attention cache layer that appends into spare capacity.

    `keys`/`values` are views of the first `length` columns of larger buffers;
    a step writes its column in place and only a full buffer is copied, into
    one a quarter larger. Methods inherited from `DynamicLayer` that replace
    `keys` (crop, batch_select_indices, ...) stay correct: the next update
    sees the replaced tensors are not its views and starts a new buffer.
    """

    def __init__(self, keys: torch.Tensor | None = None, values: torch.Tensor | None = None):
        super().__init__()
        self._key_buf: torch.Tensor | None = None
        self._value_buf: torch.Tensor | None = None
        self._views: tuple[torch.Tensor, torch.Tensor] | None = None  # handed out last
        if keys is not None and values is not None:  # adopted as they are, no copy
            self.lazy_initialization(keys, values)
            self.keys, self.values = keys, values

    @classmethod
    def over(cls, key_buf: torch.Tensor, value_buf: torch.Tensor, length: int) -> GrowingLayer:
        """A layer whose first `length` columns of these buffers hold its
        keys and values; the rest is spare capacity for the next steps."""
        layer = cls(key_buf[:, :, :length], value_buf[:, :, :length])
        layer._key_buf, layer._value_buf = key_buf, value_buf
        layer._views = (layer.keys, layer.values)
        return layer

    def _owns_views(self) -> bool:
        # Identity, not `_base`: views made under inference_mode have no base.
        return (
            self._views is not None
            and self.keys is self._views[0]
            and self.values is self._views[1]
        )

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.keys.shape[-2] if self.keys.numel() else 0
        new = length + key_states.shape[-2]
        if not self._owns_views() or self._key_buf.shape[-2] < new:
            capacity = spare_capacity(new)
            shape = (*key_states.shape[:2], capacity, key_states.shape[-1])
            self._key_buf = key_states.new_empty(shape)
            self._value_buf = value_states.new_empty(shape)
            if length:
                self._key_buf[:, :, :length] = self.keys
                self._value_buf[:, :, :length] = self.values
        self._key_buf[:, :, length:new] = key_states
        self._value_buf[:, :, length:new] = value_states
        self.keys = self._key_buf[:, :, :new]
        self.values = self._value_buf[:, :, :new]
        self._views = (self.keys, self.values)
        return self.keys, self.values

    def nbytes(self) -> int:
        """Memory held, spare capacity included."""
        if self._owns_views():
            return self._key_buf.nbytes + self._value_buf.nbytes
        return self.keys.nbytes + self.values.nbytes if self.is_initialized else 0


def spare_capacity(columns: int) -> int:
    """The columns a buffer for `columns` columns is given: a quarter more
    (at least 64), so a step writes in place and copies happen rarely."""
    return columns + max(64, columns // 4)


def growing_cache(kv: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A DynamicCache of GrowingLayers that adopts these tensors (no copy)."""
    return _cache_of([GrowingLayer(k, v) for k, v in kv])


def _cache_of(layers: list[GrowingLayer]) -> DynamicCache:
    """A DynamicCache holding exactly these layers (none added lazily)."""
    cache = DynamicCache()
    cache.layers, cache.layer_class_to_replicate = layers, None
    return cache


def supports_batching(cache: DynamicCache) -> bool:
    """Padding and slicing along the sequence axis are only sound for plain
    full-attention layers (not sliding windows, not recurrent state)."""
    return all(type(layer) in (DynamicLayer, GrowingLayer) for layer in cache.layers)


@dataclass
class KVBatch:
    cache: DynamicCache
    mask: torch.Tensor  # [rows, columns], 1 where a column holds a real token
    padded: bool = field(init=False, default=False)  # any row left-padded; steps add none

    def __post_init__(self) -> None:
        self.padded = bool((self.mask == 0).any())

    @classmethod
    def single(cls, cache: DynamicCache) -> KVBatch:
        """One freshly prefilled sequence: every column is real. The model's
        plain layers become GrowingLayers (a prefill on a cached prefix already
        has them); a cache that cannot be batched stays as the model made it."""
        n = cache.get_seq_length()
        device = cache.layers[0].keys.device
        if supports_batching(cache) and any(type(layer) is DynamicLayer for layer in cache.layers):
            cache = growing_cache([(layer.keys, layer.values) for layer in cache.layers])
        return cls(cache, torch.ones((1, n), dtype=torch.long, device=device))

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
        return KVBatch(growing_cache(kv), mask[:, start:].contiguous())

    def row_prefix(self, row: int, tokens: int) -> KVBatch:
        """A copy of one row's first `tokens` real tokens, unpadded (for the
        prefix cache and parking: it must not hold the batch's buffers alive)."""
        start = self.columns - int(self.mask[row].sum())
        kv = [
            (
                k[row : row + 1, :, start : start + tokens].clone(),
                v[row : row + 1, :, start : start + tokens].clone(),
            )
            for k, v in self._tensors()
        ]
        mask = self.mask.new_ones((1, tokens))
        return KVBatch(growing_cache(kv), mask)

    def copy_prefix(self, tokens: int) -> DynamicCache:
        """A cache of this single-row batch's first `tokens` tokens, to prefill
        the rest of a prompt on; a copy, so the stored entry stays intact."""
        kv = [(k[:, :, :tokens].clone(), v[:, :, :tokens].clone()) for k, v in self._tensors()]
        return growing_cache(kv)

    def nbytes(self) -> int:
        return sum(
            layer.nbytes()
            if isinstance(layer, GrowingLayer)
            else layer.keys.nbytes + layer.values.nbytes
            for layer in self.cache.layers
        )

    @staticmethod
    def concat(batches: Sequence[KVBatch]) -> KVBatch:
        """Stacks batches into one, left-padding each to the longest. Each
        layer's rows are written once into a new buffer with spare capacity
        (no padded intermediate, and the next steps grow it in place); the
        padding is zeros, which the mask hides (a finite value: -inf added
        to a NaN score would still be NaN)."""
        if len(batches) == 1:
            return batches[0]
        width = max(b.columns for b in batches)
        rows = sum(b.rows for b in batches)
        mask = torch.cat([torch.nn.functional.pad(b.mask, (width - b.columns, 0)) for b in batches])
        layers = []
        for parts in zip(*(b._tensors() for b in batches), strict=True):
            bufs = []
            for which in (0, 1):  # keys, values
                first = parts[0][which]
                heads, dim = first.shape[1], first.shape[3]
                buf = first.new_empty((rows, heads, spare_capacity(width), dim))
                row = 0
                for tensor in (p[which] for p in parts):
                    n, pad = tensor.shape[0], width - tensor.shape[2]
                    buf[row : row + n, :, :pad].zero_()
                    buf[row : row + n, :, pad:width] = tensor
                    row += n
                bufs.append(buf)
            layers.append(GrowingLayer.over(bufs[0], bufs[1], width))
        return KVBatch(_cache_of(layers), mask)
