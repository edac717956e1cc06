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
    dicts = _as_dicts(messages)
    kwargs = {}
    if tools and _template_takes_tools(tokenizer):
        kwargs["tools"] = [t.as_openai() for t in tools]
    elif tools:
        preamble = _TOOLS_PREAMBLE.format(tools="\n".join(json.dumps(t.as_openai()) for t in tools))
        if dicts and dicts[0]["role"] == "system":
            dicts[0] = {**dicts[0], "content": dicts[0]["content"] + "\n\n" + preamble}
        else:
            dicts.insert(0, {"role": "system", "content": preamble})
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(
            dicts, add_generation_prompt=True, tokenize=False, **kwargs
        )
        return tokenizer.encode(text, add_special_tokens=False)
    # A base model without a template: plain role-prefixed text.
    text = "".join(f"{d['role']}: {d['content']}\n" for d in dicts) + "assistant: "
    return tokenizer.encode(text)
