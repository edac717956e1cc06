"""Incremental detokenization that never emits half a character.

Byte-level BPE splits multi-byte characters across tokens, and decoding a
single token can change how the previous one renders. So each step decodes a
small window that starts a token before the last emitted text, and holds text
back while it ends in U+FFFD (an incomplete UTF-8 sequence). Cost per token is
constant: the window never grows with the output.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix_offset = 0  # window start: one emitted token of context
        self._read_offset = 0  # tokens before this are emitted
        self._pending_ids: list[int] = []  # ids not yet reported with a delta

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> tuple[str, list[int]]:
        """Adds a token; returns the new complete text (maybe empty) and the
        ids it covers (empty while text is held back)."""
        self._ids.append(token_id)
        self._pending_ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if len(full) <= len(prefix) or full.endswith(REPLACEMENT):
            return "", []
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        ids, self._pending_ids = self._pending_ids, []
        return full[len(prefix) :], ids

    def flush(self) -> tuple[str, list[int]]:
        """Whatever is held back at the end of generation, as it decodes."""
        if not self._pending_ids:
            return "", []
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        ids, self._pending_ids = self._pending_ids, []
        self._prefix_offset = self._read_offset = len(self._ids)
        return full[len(prefix) :], ids
