"""A request's prompt ids, forced ids and token limit, rendered with the
model's own tokenizer and chat template on every engine (a remote server gets
the ids, so the model sees exactly what it would see in process)."""

from __future__ import annotations

from typing import NamedTuple

from llm_worker.engines.base import GenerationRequest, RequestError
from llm_worker.prompt import fitted_prompt_ids

# Room left for the answer when tool results are cut to fit the context: the
# request's token limit, but at most this share of the context.
MAX_ANSWER_RESERVE = 0.25


class Tokenized(NamedTuple):
    prompt: list[int]
    forced: list[int] | None  # the forced completion's ids
    limit: int  # new tokens at most, within the context


def tokenize(
    tokenizer, request: GenerationRequest, max_context: int, default_max_new_tokens: int
) -> Tokenized:
    """Tool results are cut to leave the answer room (see fitted_prompt_ids);
    a prompt over the context even so is a RequestError, before any delta.
    Slow for long prompts: callers run it off the event loop."""
    if not request.messages:
        raise RequestError("messages must not be empty")
    forced = (
        tokenizer.encode(request.forced_completion, add_special_tokens=False)
        if request.forced_completion is not None
        else None
    )
    limit = request.sampling.max_new_tokens or (
        len(forced) if forced is not None else default_max_new_tokens
    )
    reserve = min(limit, int(max_context * MAX_ANSWER_RESERVE))
    ids = fitted_prompt_ids(tokenizer, request.messages, request.tools, max_context - reserve)
    room = max_context - len(ids)
    if room <= 0:
        cut = any(m.role == "tool" for m in request.messages)
        raise RequestError(
            f"prompt is {len(ids)} tokens{' with its tool results cut' if cut else ''}; "
            f"the model's context is {max_context}"
        )
    return Tokenized(ids, forced, min(limit, room))
