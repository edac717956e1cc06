"""Chat messages and tool specs to prompt token ids via the model's template,
with tool results cut where the whole would not fit the model's context."""

from __future__ import annotations

import json
import math
from dataclasses import replace

from conveyor_common.types import Message, ToolDef

# For templates that ignore `tools` (SmolLM2's among them), the tools are
# described in the system message in the Hermes convention most open models
# were tuned on.
_TOOLS_PREAMBLE = (
    "You can call these tools. To call one, write "
    '<tool_call>{{"name": <tool name>, "arguments": <arguments object>}}</tool_call>.\n'
    "<tools>\n{tools}\n</tools>"
)


def template_text(tokenizer) -> str:
    """The chat template's source; all of them where a tokenizer names
    several (a "default" and a "tool_use", say)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):
        return "\n".join(template.values())
    return template


def template_takes_tools(tokenizer) -> bool:
    """Whether the template describes tools itself; if not, the preamble does."""
    return "tools" in template_text(tokenizer)


def _as_dicts(messages: list[Message]) -> list[dict]:
    out = []
    for m in messages:
        d = {"role": m.role, "content": m.content}
        if m.name:
            d["name"] = m.name
        if m.tool_call_id:
            d["tool_call_id"] = m.tool_call_id
        out.append(d)
    return out


def prompt_ids(tokenizer, messages: list[Message], tools: list[ToolDef]) -> list[int]:
    """The prompt's token ids, tokenized the way the model saw it when it
    wrote its earlier turns.

    Each assistant message was generated after an earlier generation prompt
    (the conversation up to it, rendered with `add_generation_prompt`). The
    rendered text is cut where those earlier prompts end and each piece is
    tokenized alone. Tokenizing it whole would merge the newline that ends the
    generation prompt with the output's first characters; cut, the earlier
    prompt keeps its own ids and the output gets the ids the model wrote
    (when those are the canonical ones, as greedy output nearly always is).
    That is what lets the next round reuse the KV cache of the prompt *and*
    the output. The cuts depend only on the messages, never on what is cached.
    """
    dicts, kwargs = _with_tools(tokenizer, _as_dicts(messages), tools)
    text = _render(tokenizer, dicts, kwargs)
    cuts = []
    for i, message in enumerate(dicts):
        if message["role"] == "assistant" and i > 0:
            try:
                before = _render(tokenizer, dicts[:i], kwargs)
            except Exception:  # a template may refuse a partial conversation: no cut there
                continue
            if text.startswith(before) and (not cuts or len(before) > cuts[-1]):
                cuts.append(len(before))
    ids: list[int] = []
    for start, end in zip([0, *cuts], [*cuts, len(text)], strict=True):
        ids += _encode(tokenizer, text[start:end], first=start == 0)
    return ids


def _with_tools(tokenizer, dicts: list[dict], tools: list[ToolDef]) -> tuple[list[dict], dict]:
    """The messages and template arguments that describe the tools."""
    if tools and template_takes_tools(tokenizer):
        return dicts, {"tools": [t.as_openai() for t in tools]}
    if tools:
        preamble = _TOOLS_PREAMBLE.format(tools="\n".join(json.dumps(t.as_openai()) for t in tools))
        if dicts and dicts[0]["role"] == "system":
            dicts = [{**dicts[0], "content": dicts[0]["content"] + "\n\n" + preamble}, *dicts[1:]]
        else:
            dicts = [{"role": "system", "content": preamble}, *dicts]
    return dicts, {}


def _render(tokenizer, dicts: list[dict], kwargs: dict) -> str:
    """The conversation as text, ending in the prompt for the assistant's turn."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(
            dicts, add_generation_prompt=True, tokenize=False, **kwargs
        )
    # A base model without a template: plain role-prefixed text.
    return "".join(f"{d['role']}: {d['content']}\n" for d in dicts) + "assistant: "


def _encode(tokenizer, text: str, first: bool) -> list[int]:
    # A template writes its own special tokens; a base model's text gets the
    # tokenizer's (a BOS, say) once, at the start.
    add_special = first and not tokenizer.chat_template
    return tokenizer.encode(text, add_special_tokens=add_special)


# No tokenizer averages this many characters per token, so a tool result
# longer than budget * this cannot fit: it is cut before it is tokenized.
_MAX_CHARS_PER_TOKEN = 16
# Tokens a cut marker may take, counted in when sizing a cut.
_MARKER_TOKENS = 24
_FIT_PASSES = 8


def cut_marker(chars: int) -> str:
    """What replaces the middle of a tool result cut to fit (the model reads it)."""
    return f"\n[... {chars} characters cut to fit the model's context ...]\n"


def fitted_prompt_ids(
    tokenizer, messages: list[Message], tools: list[ToolDef], budget: int
) -> list[int]:
    """`prompt_ids`, with tool results cut until the prompt fits `budget`
    tokens: the largest first, down to a common size, each keeping its head
    and tail around a `cut_marker`. Other messages are never cut, so the
    prompt may still exceed the budget; the caller decides what then.

    The cuts depend only on the messages and the budget: the same request
    always gives the same ids.
    """
    kept = {i: len(m.content) for i, m in enumerate(messages) if m.role == "tool"}
    for i, size in kept.items():
        kept[i] = min(size, max(budget, 0) * _MAX_CHARS_PER_TOKEN)
    for _ in range(_FIT_PASSES):
        cut = _cut_messages(messages, kept)
        ids = prompt_ids(tokenizer, cut, tools)
        excess = len(ids) - budget
        if excess <= 0 or not any(kept.values()):
            return ids
        tool_text = [cut[i].content for i in kept]
        tool_tokens = sum(len(_encode(tokenizer, t, first=False)) for t in tool_text)
        chars_per_token = sum(map(len, tool_text)) / max(tool_tokens, 1)
        uncut = sum(kept[i] == len(messages[i].content) for i in kept)
        excess += _MARKER_TOKENS * uncut  # the markers that cutting them adds
        _lower_to_common_size(kept, math.ceil(excess * chars_per_token))
    return ids


def _cut_messages(messages: list[Message], kept: dict[int, int]) -> list[Message]:
    return [
        replace(m, content=_shorten(m.content, kept[i])) if i in kept else m
        for i, m in enumerate(messages)
    ]


def _shorten(text: str, keep: int) -> str:
    """`text` with its middle cut so `keep` characters of it are left."""
    if keep >= len(text):
        return text
    tail = keep // 2
    return text[: keep - tail] + cut_marker(len(text) - keep) + text[len(text) - tail :]


def _lower_to_common_size(kept: dict[int, int], chars: int) -> None:
    """Takes `chars` characters off the largest sizes: every size above a
    level drops to it (the highest level that frees enough, or 0)."""
    low, high = 0, max(kept.values())
    while low < high:  # the highest level whose cut frees at least `chars`
        level = (low + high + 1) // 2
        if sum(max(0, size - level) for size in kept.values()) >= chars:
            low = level
        else:
            high = level - 1
    for i, size in kept.items():
        kept[i] = min(size, low)
