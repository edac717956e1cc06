"""Prompts are tokenized the way the model saw its earlier turns: a later
round's ids begin with the earlier round's prompt ids and then the ids of
the model's own output, so the prefix cache can reuse both."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from conveyor_common.types import Message, ToolDef
from llm_worker.prompt import prompt_ids

# Output that opens with blank lines, as many models' does: tokenized whole,
# those newlines would merge with the one that ends "assistant\n".
CODE = (
    "\n\n```python\nimport math\nprint(math.sqrt(2))\n```\n"
    '<tool_call>{"name": "python"}</tool_call>'
)


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    return AutoTokenizer.from_pretrained(default_model_dir)


def _tool() -> ToolDef:
    return ToolDef(name="python", description="Runs Python.", parameters={"type": "object"})


def test_a_later_round_extends_the_earlier_prompt_and_output(tokenizer):
    first = [Message("system", "Be brief."), Message("user", "Square root of 2?")]
    round1 = prompt_ids(tokenizer, first, [_tool()])
    output = tokenizer.encode(CODE, add_special_tokens=False)  # what greedy decoding writes
    second = [*first, Message("assistant", CODE), Message("tool", "1.4142135623730951")]
    round2 = prompt_ids(tokenizer, second, [_tool()])
    assert round2[: len(round1) + len(output)] == round1 + output
    # Tokenized whole, the match would stop inside round 1's prompt.
    whole = tokenizer.encode(
        tokenizer.decode(round2, skip_special_tokens=False), add_special_tokens=False
    )
    assert whole[: len(round1)] != round1

    third = [*second, Message("assistant", "It is about 1.414."), Message("user", "Thanks")]
    round3 = prompt_ids(tokenizer, third, [_tool()])
    assert round3[: len(round2)] == round2


def test_the_text_is_the_chat_template_s(tokenizer):
    messages = [
        Message("user", "Hi"),
        Message("assistant", "\n\nHello! How can I help?"),
        Message("user", "Add 2 and 3."),
    ]
    ids = prompt_ids(tokenizer, messages, [])
    rendered = tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in messages],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert tokenizer.decode(ids, skip_special_tokens=False) == rendered
