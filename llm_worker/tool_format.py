"""Which tool-call format the model writes, and the tokens that delimit it.

The scheduler parses tool calls out of the text deltas, so it has to know the
format (GetModelInfo reports it) and has to see the delimiters, which some
tokenizers mark special and the detokenizer would otherwise drop.

The format is read off the chat template's source and the tokenizer's added
tokens, the way llama.cpp picks a chat handler: each family's template writes
its own markers when it renders a past call. The first rule that matches wins,
so the rules go from the most specific markers to the least.
"""

from __future__ import annotations

import structlog

from llm_worker.prompt import template_takes_tools, template_text

log = structlog.get_logger("tool_format")

# The format names, as --tool-call-format takes them and GetModelInfo reports them.
TOOL_FORMATS = (
    "hermes",
    "llama3_json",
    "pythonic",
    "mistral",
    "qwen3_coder",
    "deepseek",
    "harmony",
)

# (format, markers): the format whose markers all appear in the template.
_TEMPLATE_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    # gpt-oss: every message has a <|channel|>; a call ends with <|call|> and
    # names its recipient to=functions.NAME (the template may split that string).
    ("harmony", ("<|channel|>", "<|call|>")),
    ("harmony", ("<|channel|>", "to=functions.")),
    # DeepSeek V3/R1: calls sit between <｜tool▁calls▁begin｜> and <｜tool▁calls▁end｜>.
    ("deepseek", ("<｜tool▁calls▁begin｜>",)),
    # Qwen3-Coder (also Qwen3.5, Nemotron Nano 3): <function=NAME><parameter=X>
    # inside <tool_call>, hence before hermes; <function= alone is Functionary's.
    ("qwen3_coder", ("<function=", "<parameter=")),
    # Mistral: [TOOL_CALLS] before a JSON list, or before name[ARGS]{...}.
    ("mistral", ("[TOOL_CALLS]",)),
    # Llama 3.2/4 pythonic templates (vLLM's, ToolACE's) show a call as
    # [func_name1(params_name1=params_value1, ...)].
    ("pythonic", ("[func_name1(",)),
    # Llama 3.1/3.3 (and the JSON templates of 3.2/4): {"name": ..., "parameters":
    # ...}, bare or after <|python_tag|>, answered in the ipython role.
    ("llama3_json", ('"parameters"', "<|python_tag|>")),
    ("llama3_json", ('"parameters"', "ipython")),
    # Hermes, Qwen2.5/Qwen3: a JSON object inside <tool_call></tool_call>.
    ("hermes", ("<tool_call>",)),
)

# (format, token): for a template that shows none of the markers above, an
# added token that only one family has. <tool_call> and <|python_tag|> are not
# here: Qwen3-Coder holds the first, Hermes fine-tunes of Llama the second.
_TOKEN_RULES: tuple[tuple[str, str], ...] = (
    ("harmony", "<|call|>"),
    ("deepseek", "<｜tool▁calls▁begin｜>"),
    ("mistral", "[TOOL_CALLS]"),
)

# What each format's calls are delimited with. Those that are single tokens
# reach the scheduler as text even when the tokenizer marks them special.
DELIMITERS: dict[str, tuple[str, ...]] = {
    "hermes": ("<tool_call>", "</tool_call>"),
    "llama3_json": ("<|python_tag|>",),
    # Llama 4 may wrap its list in <|python_start|>...<|python_end|>.
    "pythonic": ("<|python_start|>", "<|python_end|>", "<|python_tag|>"),
    "mistral": ("[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"),
    "qwen3_coder": ("<tool_call>", "</tool_call>"),
    "deepseek": (
        "<｜tool▁calls▁begin｜>",
        "<｜tool▁calls▁end｜>",
        "<｜tool▁call▁begin｜>",
        "<｜tool▁call▁end｜>",
        "<｜tool▁sep｜>",
    ),
    # A call is a whole message: its header (role, channel, recipient,
    # content type), its body and the <|call|> that ends it, which is also an
    # end-of-sequence token in gpt-oss.
    "harmony": (
        "<|start|>",
        "<|channel|>",
        "<|constrain|>",
        "<|message|>",
        "<|end|>",
        "<|call|>",
    ),
}

UNKNOWN_WARNING = "tool-call format unknown; the scheduler falls back to the tag and fence formats"


def check_tool_format(name: str) -> None:
    """Raises ValueError unless `name` is a format name or "" (detect)."""
    if name and name not in TOOL_FORMATS:
        raise ValueError(
            f"unknown tool-call format {name!r}; expected one of {', '.join(TOOL_FORMATS)}"
        )


def detect_tool_format(tokenizer) -> str:
    """The format the model writes, or "" when its template shows none we know."""
    if not template_takes_tools(tokenizer):
        # The worker describes the tools itself, asking for <tool_call> (prompt.py).
        return "hermes"
    template = template_text(tokenizer)
    for name, markers in _TEMPLATE_RULES:
        if all(marker in template for marker in markers):
            return name
    added = tokenizer.get_added_vocab()
    for name, token in _TOKEN_RULES:
        if token in added:
            return name
    return ""


def choose_tool_format(tokenizer, flag: str, model: str) -> str:
    """The flag's format, else the detected one; logs which, once, at load."""
    check_tool_format(flag)
    name = flag or detect_tool_format(tokenizer)
    if name:
        source = "flag" if flag else "detected"
        log.info("tool-call format", format=name, source=source, model=model)
    else:
        log.warning(UNKNOWN_WARNING, model=model)
    return name


def delimiter_ids(tokenizer, name: str) -> frozenset[int]:
    """The ids of the format's delimiters that are one token in this vocabulary."""
    ids = set()
    for marker in DELIMITERS.get(name, ()):
        token_id = tokenizer.convert_tokens_to_ids(marker)
        # An unknown token maps to None or to the unknown token's id.
        if token_id is not None and tokenizer.convert_ids_to_tokens(token_id) == marker:
            ids.add(token_id)
    return frozenset(ids)
