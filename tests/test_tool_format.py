"""The worker's tool-call format: detected from the chat template and the
special tokens, overridden by --tool-call-format, reported by GetModelInfo,
and its delimiter tokens streamed as text while other special tokens stay
hidden. Tokenizers are the default model's, given each family's markers."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from conveyor.v1 import common_pb2, llm_worker_pb2, llm_worker_pb2_grpc
from structlog.testing import capture_logs

from conveyor_common.server import stop_server
from llm_worker.config import WorkerConfig, build_parser
from llm_worker.detokenizer import IncrementalDetokenizer, hidden_token_ids
from llm_worker.tool_format import (
    TOOL_FORMATS,
    choose_tool_format,
    delimiter_ids,
    detect_tool_format,
)
from tests.conftest import save_tiny_model

HARMONY_TOKENS = ["<|start|>", "<|channel|>", "<|constrain|>", "<|message|>", "<|end|>", "<|call|>"]

# A template that takes tools and writes a past call the gpt-oss way (the
# recipient string split in two, as gpt-oss's own template has it).
HARMONY_TEMPLATE = (
    "{%- if tools %}<|start|>developer<|message|>{{ tools | tojson }}<|end|>{% endif %}"
    "{%- for m in messages %}<|start|>{{ m.role }}<|message|>{{ m.content }}<|end|>{% endfor %}"
    '{%- if false %}{{ "<|start|>assistant to=" }}'
    '{{ "functions." + name + "<|channel|>commentary " }}'
    '{{ "json<|message|>{}<|call|>" }}{% endif %}'
    "{%- if add_generation_prompt %}<|start|>assistant{% endif %}"
)

# (expected format, chat template, special tokens): short templates that take
# tools and render a past call with the family's markers.
FAMILIES = [
    ("hermes", '{{ tools }}<tool_call>{"name": n, "arguments": a}</tool_call>', []),
    # Also holds <tool_call>: the XML markers are the more specific.
    (
        "qwen3_coder",
        "{{ tools }}<tool_call>\n<function=NAME>\n<parameter=x>\n1\n</parameter>\n"
        "</function>\n</tool_call>",
        ["<tool_call>", "</tool_call>"],
    ),
    (
        "llama3_json",
        "{{ tools }}<|start_header_id|>ipython<|end_header_id|>"
        '{{- "<|python_tag|>" + \'{"name": "\' + name + \'", "parameters": \' + args }}',
        ["<|python_tag|>"],
    ),
    # Llama 3.2's JSON template: no <|python_tag|>, the ipython role.
    (
        "llama3_json",
        '{{ tools }}Respond in the format {"name": function name, "parameters": dictionary}'
        "<|start_header_id|>ipython<|end_header_id|>",
        [],
    ),
    # Also has llama3_json's markers (in the tools' description): the call's
    # shape is the more specific.
    (
        "pythonic",
        '{{ tools }}Each is {"name": ..., "parameters": ...}. Respond in the format '
        "[func_name1(params_name1=params_value1), func_name2()]"
        "<|start_header_id|>ipython<|end_header_id|>",
        [],
    ),
    ("mistral", "[AVAILABLE_TOOLS]{{ tools }}[/AVAILABLE_TOOLS][TOOL_CALLS]", ["[TOOL_CALLS]"]),
    (
        "deepseek",
        "{{ tools }}<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\n"
        "```json\n{}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
        ["<｜tool▁calls▁begin｜>", "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>"],
    ),
    ("harmony", HARMONY_TEMPLATE, HARMONY_TOKENS),
    # Without <|call|> in the template, the recipient names the format.
    ("harmony", "{{ tools }}<|channel|>commentary to=functions.NAME<|message|>", []),
]


@pytest.fixture
def tokenizer(default_model_dir):
    """A fresh copy of the default model's tokenizer (tests change it)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


def _with(tokenizer, template: str | None, tokens: list[str]):
    tokenizer.chat_template = template
    if tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": tokens})
    return tokenizer


def test_every_format_has_a_detection_case():
    assert {name for name, _, _ in FAMILIES} == set(TOOL_FORMATS)


@pytest.mark.parametrize(("expected", "template", "tokens"), FAMILIES)
def test_detects_each_family_from_its_template(tokenizer, expected, template, tokens):
    assert detect_tool_format(_with(tokenizer, template, tokens)) == expected


@pytest.mark.parametrize(
    ("expected", "token"),
    [("mistral", "[TOOL_CALLS]"), ("harmony", "<|call|>"), ("deepseek", "<｜tool▁calls▁begin｜>")],
)
def test_a_special_token_decides_when_the_template_shows_no_markers(tokenizer, expected, token):
    assert detect_tool_format(_with(tokenizer, "{{ tools | tojson }}", [token])) == expected


def test_a_template_that_ignores_tools_gets_the_preamble_format(tokenizer):
    # SmolLM2's own template: the worker's Hermes preamble describes the tools.
    assert "tools" not in tokenizer.chat_template
    assert detect_tool_format(tokenizer) == "hermes"
    # The preamble is what the model is told, whatever tokens its vocabulary has.
    assert detect_tool_format(_with(tokenizer, None, ["[TOOL_CALLS]"])) == "hermes"


def test_an_unknown_format_is_empty_and_logged_once(tokenizer):
    _with(tokenizer, "{% for t in tools %}{{ t | tojson }}{% endfor %}", [])
    assert detect_tool_format(tokenizer) == ""
    with capture_logs() as logs:
        assert choose_tool_format(tokenizer, "", "acme/model") == ""
    assert logs == [
        {
            "event": "tool-call format unknown; the scheduler falls back to the tag "
            "and fence formats",
            "model": "acme/model",
            "log_level": "warning",
        }
    ]


def test_the_flag_overrides_detection(tokenizer):
    args = build_parser().parse_args(["--tool-call-format", "mistral"])
    config = WorkerConfig.from_args(args)
    assert config.tool_call_format == "mistral"
    assert detect_tool_format(tokenizer) == "hermes"
    assert choose_tool_format(tokenizer, config.tool_call_format, "m") == "mistral"
    assert WorkerConfig.from_args(build_parser().parse_args([])).tool_call_format == ""


def test_a_bad_format_name_is_rejected(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--tool-call-format", "hermes3"])
    assert "hermes3" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown tool-call format 'hermes3'"):
        WorkerConfig(tool_call_format="hermes3")


async def test_model_info_reports_the_format(worker):
    _, target = worker  # the tiny model has SmolLM2's template: the preamble's format
    async with grpc.aio.insecure_channel(target) as channel:
        stub = llm_worker_pb2_grpc.LlmWorkerServiceStub(channel)
        info = await stub.GetModelInfo(llm_worker_pb2.GetModelInfoRequest(), timeout=10)
    assert info.tool_call_format == "hermes"


def test_detokenizer_shows_delimiters_and_hides_other_special_tokens(tokenizer):
    _with(tokenizer, HARMONY_TEMPLATE, HARMONY_TOKENS)
    text = '<|im_start|>Hi <|channel|>commentary<|message|>{"x": 1}<|call|><|im_end|>'
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.bos_token_id in ids and tokenizer.eos_token_id in ids
    shown = delimiter_ids(tokenizer, "harmony")
    assert len(shown) == len(HARMONY_TOKENS)
    detok = IncrementalDetokenizer(tokenizer, hidden_token_ids(tokenizer, shown))
    pieces = [detok.push(i)[0] for i in ids] + [detok.flush()[0]]
    assert "".join(pieces) == 'Hi <|channel|>commentary<|message|>{"x": 1}<|call|>'
    # Without a format, every special token stays hidden, as before.
    detok = IncrementalDetokenizer(tokenizer)
    assert "".join(detok.push(i)[0] for i in ids) + detok.flush()[0] == 'Hi commentary{"x": 1}'


# ---- a worker on a tiny model whose tokenizer has gpt-oss's delimiters ----------


@pytest.fixture(scope="module")
def harmony_model_dir(tmp_path_factory, default_model_dir):
    """A 2-layer random Llama with the default tokenizer plus harmony's special
    tokens and a template that shows them; <|call|> ends a sequence, as in gpt-oss."""
    from transformers import AutoTokenizer

    tokenizer = _with(AutoTokenizer.from_pretrained(default_model_dir), HARMONY_TEMPLATE, [])
    tokenizer.add_special_tokens({"additional_special_tokens": HARMONY_TOKENS})
    call = tokenizer.convert_tokens_to_ids("<|call|>")
    return save_tiny_model(
        tokenizer,
        tmp_path_factory.mktemp("harmony-model"),
        context=4096,
        eos_ids=[tokenizer.eos_token_id, call],
    )


@pytest.fixture(scope="module")
async def harmony_worker(harmony_model_dir):
    """(engine, stub) of a worker on that model, its format detected."""
    from llm_worker.engines.hf import build_hf_engine
    from llm_worker.server import create_server

    config = WorkerConfig(model=str(harmony_model_dir), max_new_tokens=8)
    engine = await asyncio.to_thread(build_hf_engine, config)
    server, port = await create_server(config, engine=engine)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield engine, llm_worker_pb2_grpc.LlmWorkerServiceStub(channel)
    await stop_server(server, 0)


async def _generate(stub, **kw) -> tuple[str, list[int], llm_worker_pb2.GenerateComplete]:
    request = llm_worker_pb2.GenerateRequest(
        messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="Weather?")], **kw
    )
    text, ids, complete = "", [], None
    async for response in stub.Generate(request, timeout=60):
        if response.WhichOneof("event") == "delta":
            text += response.delta.text
            ids += response.delta.token_ids
        elif response.WhichOneof("event") == "complete":
            complete = response.complete
        else:
            pytest.fail(response.error.message)
    return text, ids, complete


async def test_the_detected_format_is_reported(harmony_worker):
    engine, stub = harmony_worker
    info = await stub.GetModelInfo(llm_worker_pb2.GetModelInfoRequest(), timeout=10)
    assert info.tool_call_format == engine.tool_call_format == "harmony"


async def test_delimiters_stream_as_text_and_bos_eos_stay_hidden(harmony_worker):
    _, stub = harmony_worker
    call = '<|channel|>commentary to=functions.weather <|constrain|>json<|message|>{"city": "Oslo"}'
    forced = common_pb2.ForcedDecoding(
        completion=f"<|im_start|>Let me look.<|end|><|start|>assistant{call}<|call|><|im_end|>"
    )
    text, _, complete = await _generate(stub, forced_decoding=forced)
    assert complete.finish_reason == common_pb2.FINISH_REASON_FORCED_END
    assert text == f"Let me look.<|end|><|start|>assistant{call}<|call|>"


def _always(engine, token_id: int):
    """Makes the model pick `token_id` every step (a hook on its logits)."""

    def hook(_module, _args, output):
        output.logits[..., token_id] = 1e4

    return engine.model.register_forward_hook(hook)


async def test_an_end_token_that_delimits_a_call_is_streamed_before_the_stop(harmony_worker):
    engine, stub = harmony_worker
    call = engine.tokenizer.convert_tokens_to_ids("<|call|>")
    handle = _always(engine, call)
    try:
        text, ids, complete = await _generate(stub)
    finally:
        handle.remove()
    assert (text, ids) == ("<|call|>", [call])
    assert complete.finish_reason == common_pb2.FINISH_REASON_STOP
    assert complete.completion_tokens == 1


async def test_a_plain_end_token_still_stops_unseen(harmony_worker):
    engine, stub = harmony_worker
    handle = _always(engine, engine.tokenizer.eos_token_id)
    try:
        text, ids, complete = await _generate(stub)
    finally:
        handle.remove()
    assert (text, ids) == ("", [])
    assert complete.finish_reason == common_pb2.FINISH_REASON_STOP
    assert complete.completion_tokens == 0  # not even taken as output
