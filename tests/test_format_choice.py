"""How a run's tool-call formats are chosen: the request's envelopes when it
names any; otherwise the format the worker says its model writes (Hermes tags
when unknown), plus fences when a tool runs a fenced language."""

from __future__ import annotations

from conveyor_common.types import Envelope, PartialMode
from scheduler.tools import ToolInfo, default_envelopes, model_envelope

PYTHON = {"python": ToolInfo("python", partial_mode=PartialMode.PYTHON_STATEMENTS)}
SEARCH = {"search": ToolInfo("search", partial_mode=PartialMode.JSON_FIELDS)}


def test_the_workers_names_map_to_envelopes():
    assert model_envelope("hermes") is Envelope.TAG
    assert model_envelope("llama3_json") is Envelope.LLAMA3_JSON
    assert model_envelope("harmony") is Envelope.HARMONY
    assert model_envelope("") is None
    assert model_envelope("no-such-format") is None
    assert model_envelope("plan") is None and model_envelope("fence") is None  # not model formats


def test_the_models_format_replaces_the_tag_format():
    assert default_envelopes(PYTHON, Envelope.MISTRAL) == {Envelope.MISTRAL, Envelope.FENCE}
    assert default_envelopes(SEARCH, Envelope.QWEN3_CODER) == {Envelope.QWEN3_CODER}


def test_an_unknown_format_falls_back_to_tags_and_fences():
    assert default_envelopes(PYTHON, None) == {Envelope.TAG, Envelope.FENCE}
    assert default_envelopes({}, None) == frozenset()
