"""Chat messages and tool specs to prompt token ids via the model's template."""

from __future__ import annotations

import json

from conveyor_common.types import Message, ToolDef

# For templates that ignore `tools` (SmolLM2's among them), the tools are
# described in the system message in the Hermes convention most open models
# were tuned on.
_TOOLS_PREAMBLE = (
    "You can call these tools. To call one, write "
    '<tool_call>{{"name": <tool name>, "arguments": <arguments object>}}</tool_call>.\n'
    "<tools>\n{tools}\n</tools>"
)


def _template_takes_tools(tokenizer) -> bool:
    template = tokenizer.chat_template or ""
    return "tools" in template


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
    if tools and _template_takes_tools(tokenizer):
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
