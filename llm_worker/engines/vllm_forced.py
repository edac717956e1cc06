"""Forced decoding inside vLLM: a logits processor that leaves only the
forced completion's next token possible, so each forced token still costs
one real decode step in vLLM's batch (the benchmark compares partial and
sequential execution on identical output this way).

A request asks for it with `SamplingParams.extra_args[FORCED_KEY]` (the
token ids); through vLLM's OpenAI server the same list goes in the request's
`vllm_xargs`, once the server was started with
`--logits-processors llm_worker.engines.vllm_forced:ForcedTokens`.

Imported only where vLLM is installed (the vllm engine, the vLLM server).
"""

from __future__ import annotations

import torch
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

FORCED_KEY = "conveyor_forced"
# What `--logits-processors` names for a vLLM server to honour FORCED_KEY.
QUALIFIED_NAME = f"{__name__}:ForcedTokens"


def _forcing(forced: list[int]):
    def force(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        step = len(output_ids)
        if step < len(forced):  # past the end max_tokens has already stopped it
            keep = logits[forced[step]].clone()
            logits.fill_(float("-inf"))
            logits[forced[step]] = keep if torch.isfinite(keep) else 0.0
        return logits

    return force


class ForcedTokens(AdapterLogitsProcessor):
    @classmethod
    def validate_params(cls, params) -> None:
        forced = (params.extra_args or {}).get(FORCED_KEY)
        if forced is not None and not (
            isinstance(forced, list) and all(isinstance(t, int) and t >= 0 for t in forced)
        ):
            raise ValueError(f"{FORCED_KEY} must be a list of token ids")

    def is_argmax_invariant(self) -> bool:
        return False  # it changes which token wins

    def new_req_logits_processor(self, params):
        forced = (params.extra_args or {}).get(FORCED_KEY)
        return _forcing(forced) if forced else None
