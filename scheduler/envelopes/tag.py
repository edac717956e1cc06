"""Hermes-style tags (Hermes, Qwen2.5, and SmolLM2 through the worker's tool
preamble): `<tool_call>{"name": …, "arguments": …}</tool_call>`, several per
message. The call's text is the JSON between the tags, which names the tool
(scheduler/parsers/tool_call_tag.py reads it)."""

from __future__ import annotations

from conveyor_common.types import Envelope
from scheduler.envelopes.base import CallBody, CallOpened, EnvelopeFormat, UntilMarker

TAG_OPEN = "<tool_call>"
TAG_CLOSE = "</tool_call>"

FORMAT = EnvelopeFormat(
    name=Envelope.TAG,
    starts=(TAG_OPEN,),
    region=lambda marker, context: UntilMarker(
        TAG_CLOSE, CallOpened(Envelope.TAG, "", CallBody.CALL_JSON)
    ),
)
