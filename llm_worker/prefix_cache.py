"""KV caches of finished sequences, kept for the next round of the same
conversation.

A tool-calling run sends the model its own earlier prompt and output again,
plus the tool results: everything up to the end of the last round is a
prefix whose keys and values the worker already computed. Entries are keyed
by their token ids; a new prompt reuses the entry with the longest common
prefix and prefills only the rest. Least recently used entries go first once
the token budget is full.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

from llm_worker.kv_batch import KVBatch


class PrefixCache:
    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self._entries: OrderedDict[int, tuple[torch.Tensor, KVBatch]] = OrderedDict()
        self._next_key = 0
        self.tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, ids: Sequence[int]) -> tuple[int, KVBatch | None]:
        """The longest cached prefix of `ids`: (its length, its entry)."""
        if not self._entries or not ids:
            return 0, None
        query = torch.tensor(ids)
        best, best_key = 0, None
        for key, (stored, _) in self._entries.items():
            n = min(len(stored), len(query))
            same = stored[:n] == query[:n]
            common = n if bool(same.all()) else int((~same).int().argmax())
            if common > best:
                best, best_key = common, key
        if best_key is None:
            return 0, None
        self._entries.move_to_end(best_key)
        return best, self._entries[best_key][1]

    def store(self, ids: Sequence[int], kv: KVBatch) -> None:
        """Keeps `kv` (one row, exactly `ids`) unless it alone overflows the
        budget; drops entries it extends, then the least recently used."""
        if not ids or len(ids) > self.max_tokens:
            return
        stored = torch.tensor(ids)
        for key, (other, _) in list(self._entries.items()):
            if len(other) <= len(stored) and bool((stored[: len(other)] == other).all()):
                self._drop(key)  # the new entry covers it
        self._entries[self._next_key] = (stored, kv)
        self._next_key += 1
        self.tokens += len(ids)
        while self.tokens > self.max_tokens:
            self._drop(next(iter(self._entries)))

    def clear(self) -> None:
        self._entries.clear()
        self.tokens = 0

    def _drop(self, key: int) -> None:
        stored, _ = self._entries.pop(key)
        self.tokens -= len(stored)
