"""The rules every engine's output goes through (engines/output.py), and the
engine flags' checks: fast, no model, the default tokenizer."""

from __future__ import annotations

import pytest

from conveyor_common.types import FinishReason
from llm_worker.config import WorkerConfig
from llm_worker.engines.output import TokenOutput, TokenRules


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


def _feed(out: TokenOutput, ids: list[int]) -> tuple[str, FinishReason | None, int]:
    text, reason, fed = "", None, 0
    for token in ids:
        delta, reason = out.push(token)
        fed += 1
        text += delta.text if delta else ""
        if reason is not None:
            break
    tail = out.flush()
    return text + (tail.text if tail else ""), reason, fed


def test_text_is_whole_characters_and_ends_at_the_limit(tokenizer):
    rules = TokenRules.of(tokenizer, "hermes")
    ids = tokenizer.encode("naïve 🚀 text that goes on and on", add_special_tokens=False)
    text, reason, fed = _feed(TokenOutput(tokenizer, rules, limit=len(ids)), ids)
    assert text == "naïve 🚀 text that goes on and on"
    assert reason is FinishReason.LENGTH and fed == len(ids)


def test_an_end_token_ends_unseen_and_uncounted(tokenizer):
    rules = TokenRules.of(tokenizer, "hermes")
    out = TokenOutput(tokenizer, rules, limit=100)
    ids = tokenizer.encode("done", add_special_tokens=False) + [tokenizer.eos_token_id, 42]
    text, reason, fed = _feed(out, ids)
    assert (text, reason, fed) == ("done", FinishReason.STOP, len(ids) - 1)
    assert out.generated == ids[:-2]


def test_a_stop_string_split_over_tokens_is_found(tokenizer):
    rules = TokenRules.of(tokenizer, "hermes")
    ids = tokenizer.encode("alpha beta<END>gamma", add_special_tokens=False)
    out = TokenOutput(tokenizer, rules, limit=100, stop=("<END>",))
    text, reason, _ = _feed(out, ids)
    assert reason is FinishReason.STOP_STRING
    assert text.startswith("alpha beta<END>") and "gamma" not in text


def test_a_forced_completion_ends_at_its_last_token_and_ignores_eos(tokenizer):
    rules = TokenRules.of(tokenizer, "hermes")
    forced = tokenizer.encode("x", add_special_tokens=False) + [tokenizer.eos_token_id]
    out = TokenOutput(tokenizer, rules, limit=len(forced), forced=forced)
    assert out.next_forced() == forced[0]
    _, reason, fed = _feed(out, forced)
    assert reason is FinishReason.FORCED_END and fed == len(forced)


def test_special_tokens_are_hidden_but_a_formats_delimiters_show(tokenizer):
    """SmolLM2's <|im_start|> is special: hidden. With a format whose
    delimiter is that token, it is shown (as gpt-oss's <|call|> is)."""
    special = tokenizer.convert_tokens_to_ids("<|im_start|>")
    plain = TokenOutput(tokenizer, TokenRules.of(tokenizer, "hermes"), limit=10)
    assert _feed(plain, [special])[0] == ""
    rules = TokenRules.of(tokenizer, "hermes")
    shown = TokenRules(rules.eos_ids, frozenset({special}), rules.hidden_ids - {special})
    assert _feed(TokenOutput(tokenizer, shown, limit=10), [special])[0] == "<|im_start|>"


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"engine": "tgi"}, "unknown engine"),
        ({"engine": "openai"}, "needs --engine-url"),
        ({"engine": "openai", "engine_url": "x", "engine_read_timeout": 0}, "more than 0"),
    ],
)
def test_engine_flags_are_checked(kw, message):
    with pytest.raises(ValueError, match=message):
        WorkerConfig(**kw)


def test_engine_urls_and_vllm_arguments():
    from llm_worker.engines.openai_remote import base_url
    from llm_worker.engines.vllm_engine import CPU_KV_CACHE_BYTES, engine_args

    assert base_url("http://h:8000/v1/") == base_url("http://h:8000") == "http://h:8000"
    with pytest.raises(ValueError, match="http"):
        base_url("h:8000")
    config = WorkerConfig(engine="vllm", engine_args='{"max_num_seqs": 4, "seed": 1}')
    args = engine_args(config, "/m", "float32", on_cpu=True)
    assert args["max_num_seqs"] == 4 and args["seed"] == 1
    assert args["kv_cache_memory_bytes"] == CPU_KV_CACHE_BYTES
    assert "kv_cache_memory_bytes" not in engine_args(config, "/m", "bfloat16", on_cpu=False)
    for bad in ("[1]", "{nope"):
        with pytest.raises(ValueError, match="--engine-args"):
            engine_args(WorkerConfig(engine="vllm", engine_args=bad), "/m", "float32", True)
