"""From generated token ids to what a client sees, the same on every engine:
text deltas that never split a character, special tokens hidden but for the
tool-call delimiters, and where the output ends (end of sequence, a stop
string, the forced completion's end, the token limit).

Engines that run elsewhere (vLLM, a remote server) hand back token ids and
this decides; so the scheduler sees the same text and the same finish reasons
whichever engine decoded."""

from __future__ import annotations

from dataclasses import dataclass

from conveyor_common.types import FinishReason
from llm_worker.detokenizer import IncrementalDetokenizer, hidden_token_ids
from llm_worker.engines.base import Delta
from llm_worker.tool_format import delimiter_ids


@dataclass(frozen=True)
class TokenRules:
    """A model's token facts every request shares, computed once."""

    eos_ids: frozenset[int]
    # Tool-call delimiters: shown although special; one of them may also end
    # the sequence (gpt-oss's <|call|>), and then its text still goes out.
    delimiter_ids: frozenset[int]
    hidden_ids: frozenset[int]

    @classmethod
    def of(cls, tokenizer, tool_call_format: str, *configs) -> TokenRules:
        """`configs`: the model's config and generation config, whose
        eos_token_id may name more ids than the tokenizer's."""
        shown = delimiter_ids(tokenizer, tool_call_format)
        return cls(
            eos_ids=frozenset(eos_ids(tokenizer, *configs)),
            delimiter_ids=shown,
            hidden_ids=hidden_token_ids(tokenizer, shown),
        )


class TokenOutput:
    """One request's output, fed a token at a time."""

    def __init__(
        self,
        tokenizer,
        rules: TokenRules,
        *,
        limit: int,
        stop: tuple[str, ...] = (),
        forced: list[int] | None = None,
    ) -> None:
        self.rules = rules
        self.limit = limit
        self.stop = stop
        self.forced = forced
        self.generated: list[int] = []
        self._detok = IncrementalDetokenizer(tokenizer, rules.hidden_ids)
        self._tail = ""  # the end of the text, for stop strings
        self._longest_stop = max((len(s) for s in stop), default=0)

    def push(self, token: int) -> tuple[Delta | None, FinishReason | None]:
        """Takes the next token: the text it completes (None while held back)
        and why the output ends here (None to go on). An end-of-sequence
        token ends it unseen and uncounted, unless it is also a delimiter."""
        eos = self.forced is None and token in self.rules.eos_ids
        if eos and token not in self.rules.delimiter_ids:
            return None, FinishReason.STOP
        self.generated.append(token)
        text, ids = self._detok.push(token)
        delta = Delta(text, ids) if text else None
        if eos:
            return delta, FinishReason.STOP
        if delta and self._hits_stop(text):
            return delta, FinishReason.STOP_STRING
        if self.forced is not None and len(self.generated) == len(self.forced):
            return delta, FinishReason.FORCED_END
        if len(self.generated) >= self.limit:
            return delta, FinishReason.LENGTH
        return delta, None

    def next_forced(self) -> int:
        """The forced completion's next token (only while one is forced)."""
        return self.forced[len(self.generated)]

    def flush(self) -> Delta | None:
        """Text held back at the end (a character cut by the token limit)."""
        text, ids = self._detok.flush()
        return Delta(text, ids) if text else None

    def _hits_stop(self, text: str) -> bool:
        if not self.stop:
            return False
        self._tail = (self._tail + text)[-(self._longest_stop + len(text)) :]
        return any(s in self._tail for s in self.stop)


def eos_ids(tokenizer, *configs) -> set[int]:
    ids: set[int] = set()
    for source in (*configs, tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return ids
