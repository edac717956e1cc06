"""What the servicer sees of an engine: plain requests in, deltas and one
Completion out, abort, info and health. Every engine (hf, vllm, openai)
implements `Engine`; none of them sees protobuf."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from conveyor_common.types import FinishReason, Message, Sampling, ToolDef


@dataclass(frozen=True)
class GenerationRequest:
    messages: list[Message]
    tools: list[ToolDef] = field(default_factory=list)
    sampling: Sampling = field(default_factory=Sampling)
    # Benchmark feature: emit these tokens, one real decode step each.
    forced_completion: str | None = None
    request_id: str = ""


@dataclass(frozen=True)
class Delta:
    text: str
    token_ids: list[int]


@dataclass(frozen=True)
class Completion:
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    queue_seconds: float
    prefill_seconds: float
    decode_seconds: float
    message: str = ""  # set for ERROR
    cached_prompt_tokens: int = 0
    prefill_seconds_saved: float = 0.0  # estimated, from the measured prefill rate


class RequestError(ValueError):
    """A request the engine cannot run as given (a client error)."""


class EngineUnavailable(RuntimeError):
    """The engine cannot take requests now (a remote server is down)."""


@dataclass(frozen=True)
class EngineInfo:
    """What GetModelInfo reports."""

    model: str  # the label: a Hugging Face id, a path, or the default's name
    device: str  # "cpu", "cuda:0", or the remote server's URL
    dtype: str  # "float32", "bfloat16", … ("" where a remote server does not say)
    max_context: int  # tokens, prompt and output together
    tool_call_format: str  # "" when unknown
    engine: str  # "hf", "vllm" or "openai"


@runtime_checkable
class Engine(Protocol):
    @property
    def info(self) -> EngineInfo: ...

    @property
    def running(self) -> int:
        """Requests whose stream is still open."""
        ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[Delta | Completion]:
        """Streams deltas, then one Completion. Leaving the iterator early
        stops the request. Raises RequestError (before any item) for a
        request it cannot run, EngineUnavailable when it cannot run any."""
        ...

    def abort(self, request_id: str) -> bool:
        """Ends a running request (ABORTED); False when none runs by that id."""
        ...

    async def healthy(self) -> bool:
        """Whether a request sent now could run (a remote server answers)."""
        ...

    def stop(self) -> None:
        """Ends every request (ABORTED) and frees the engine."""
        ...
