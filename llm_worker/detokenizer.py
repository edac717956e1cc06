"""Incremental detokenization that never emits half a character.

Byte-level BPE splits multi-byte characters across tokens, and decoding a
single token can change how the previous one renders. So each step decodes a
small window that starts a token before the last emitted text, and holds text
back while it ends in U+FFFD (an incomplete UTF-8 sequence). Cost per token is
constant: the window never grows with the output.

Special tokens (BOS, EOS, end of turn) are left out of the text, except those
the caller names as shown: the delimiters of the model's tool calls, which the
scheduler's parser reads (see tool_format.py).
"""

from __future__ import annotations

from collections.abc import Iterable

REPLACEMENT = "\ufffd"


def hidden_token_ids(tokenizer, shown: Iterable[int] = ()) -> frozenset[int]:
    """The special tokens left out of the text: all of them but `shown`. The
    same set `skip_special_tokens=True` drops (added tokens marked special),
    with the tokenizer's named ones (BOS, EOS, pad) in case one is not added."""
    added = getattr(tokenizer, "added_tokens_decoder", {})
    special = {i for i, token in added.items() if token.special}
    special.update(tokenizer.all_special_ids)
    return frozenset(special.difference(shown))


class IncrementalDetokenizer:
    def __init__(self, tokenizer, hidden_ids: frozenset[int] | None = None) -> None:
        """`hidden_ids`: the ids to leave out (default: every special token);
        an engine computes them once for all its requests."""
        self._tokenizer = tokenizer
        self._hidden = hidden_token_ids(tokenizer) if hidden_ids is None else hidden_ids
        self._ids: list[int] = []
        self._prefix_offset = 0  # window start: one emitted token of context
        self._read_offset = 0  # tokens before this are emitted
        self._pending_ids: list[int] = []  # ids not yet reported with a delta

    def _decode(self, ids: list[int]) -> str:
        # Filtered here rather than by skip_special_tokens, which is all or nothing.
        kept = [i for i in ids if i not in self._hidden]
        return self._tokenizer.decode(kept, skip_special_tokens=False)

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
