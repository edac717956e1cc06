"""The shared half of engines that decode elsewhere (vLLM in its engine-core
process, a remote OpenAI-compatible server): they produce chunks of token
ids; this turns them into the worker's stream (TokenOutput decides the text
and the end, as on the hf engine), keeps the running set, handles abort and
cancel, and records the worker's metrics.

A subclass says how to start a request (`_chunks`) and how to stop one early
(`_cancel`); everything a client sees is decided here, once."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import structlog

from conveyor_common.types import FinishReason
from llm_worker import metrics
from llm_worker.engines.base import Completion, Delta, GenerationRequest, RequestError
from llm_worker.engines.output import TokenOutput, TokenRules
from llm_worker.engines.prepare import Tokenized, tokenize

log = structlog.get_logger("engine")


@dataclass(frozen=True)
class TokenChunk:
    """New token ids of one request, as the engine sent them."""

    ids: list[int]
    finish: FinishReason | None = None  # set when the engine ended the output
    cached_tokens: int = 0  # prompt tokens its prefix cache served (first chunk)
    message: str = ""  # set with finish=ERROR


@dataclass
class _Active:
    aborted: asyncio.Event = field(default_factory=asyncio.Event)


class RelayEngine:
    """Subclasses set `tokenizer`, `rules` (TokenRules), `max_context` and
    `default_max_new_tokens`, and implement `_chunks` and `_cancel`."""

    tokenizer = None
    rules: TokenRules
    max_context: int
    default_max_new_tokens: int = 512

    def __init__(self) -> None:
        self._active: dict[str, _Active] = {}
        self._cancels: set[asyncio.Future] = set()

    @property
    def running(self) -> int:
        return len(self._active)

    def abort(self, request_id: str) -> bool:
        active = self._active.get(request_id)
        if active is None or active.aborted.is_set():
            return False
        active.aborted.set()
        return True

    def tokenize(self, request: GenerationRequest) -> Tokenized:
        return tokenize(self.tokenizer, request, self.max_context, self.default_max_new_tokens)

    def _chunks(
        self, engine_id: str, tokens: Tokenized, request: GenerationRequest
    ) -> AsyncIterator[TokenChunk]:
        raise NotImplementedError

    def in_flight(self) -> int:
        """Requests inside the engine; an engine that can see its own set says."""
        return len(self._active)

    def _cancelled(self, cancel: asyncio.Future) -> None:
        """An engine-side cancel finished. The gauge is read again now: a
        handler cancelled while it waited set it before the engine let go."""
        self._cancels.discard(cancel)
        metrics.RUNNING.set(self.in_flight())

    async def _cancel(self, engine_id: str) -> None:
        """Stops a request the stream has left early (a stop string, an
        abort, a dropped client): it must leave the engine's batch now."""
        raise NotImplementedError

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta | Completion]:
        request_id = request.request_id or uuid.uuid4().hex
        if request_id in self._active:
            raise RequestError(f"request_id {request_id!r} is already running")
        active = self._active[request_id] = _Active()
        metrics.RUNNING.set(self.in_flight())
        try:
            async for item in self._relay(request, active):
                yield item
        finally:
            self._active.pop(request_id, None)
            metrics.RUNNING.set(self.in_flight())

    async def _relay(
        self, request: GenerationRequest, active: _Active
    ) -> AsyncIterator[Delta | Completion]:
        enqueued = time.perf_counter()
        tokens = await asyncio.to_thread(self.tokenize, request)
        out = TokenOutput(
            self.tokenizer,
            self.rules,
            limit=tokens.limit,
            stop=request.sampling.stop,
            forced=tokens.forced,
        )
        engine_id = uuid.uuid4().hex  # ours, never a client's, inside the engine
        chunks = aiter(self._chunks(engine_id, tokens, request))
        first_at = last_at = 0.0
        cached = 0
        reason: FinishReason | None = FinishReason.FORCED_END if tokens.forced == [] else None
        message = ""
        ended_by_engine = False
        aborted = asyncio.ensure_future(active.aborted.wait())
        step: asyncio.Future | None = None
        try:
            while reason is None:
                step = asyncio.ensure_future(anext(chunks, None))
                await asyncio.wait({step, aborted}, return_when=asyncio.FIRST_COMPLETED)
                if not step.done():
                    step.cancel()
                    reason = FinishReason.ABORTED
                    break
                chunk: TokenChunk | None = step.result()
                if chunk is None:  # the engine's stream ended without saying why
                    reason, message = FinishReason.ERROR, "the engine's stream ended early"
                    ended_by_engine = True
                    break
                cached = cached or chunk.cached_tokens
                for token in chunk.ids:
                    taken = len(out.generated)
                    delta, reason = out.push(token)
                    if len(out.generated) > taken:
                        now = time.perf_counter()
                        if taken == 0:
                            first_at = now
                            metrics.TIME_TO_FIRST_TOKEN.observe(now - enqueued)
                            metrics.RUNNING.set(self.in_flight())  # now inside the engine
                        else:
                            metrics.INTER_TOKEN_LATENCY.observe(now - last_at)
                        last_at = now
                    if delta is not None:
                        yield delta
                    if reason is not None:
                        break
                if reason is None and chunk.finish is not None:
                    reason, message = chunk.finish, chunk.message
                    ended_by_engine = True
                elif reason is not None and chunk.finish is not None:
                    ended_by_engine = True
            if tokens.forced is not None and not _followed(out.generated, tokens.forced, reason):
                reason = FinishReason.ERROR
                message = "the engine did not follow the forced completion"
            if reason not in (FinishReason.ERROR, FinishReason.ABORTED):
                tail = out.flush()
                if tail is not None:
                    yield tail
        finally:
            aborted.cancel()
            if step is not None and not step.done():
                # A read left mid-way (an abort, a client gone): the engine's
                # generator must unwind before it can be closed.
                step.cancel()
                await asyncio.wait({step})
            if not ended_by_engine:
                # Our end came first (a stop string, an abort, a client gone):
                # the engine must stop decoding it now, not at its token limit.
                # Shielded and held, so a cancelled handler still cancels it.
                cancel = asyncio.ensure_future(self._cancel(engine_id))
                self._cancels.add(cancel)
                cancel.add_done_callback(self._cancelled)
                await asyncio.shield(cancel)
            await chunks.aclose()
        metrics.GENERATED_TOKENS.inc(len(out.generated))
        metrics.PROMPT_TOKENS.inc(len(tokens.prompt))
        metrics.CACHED_PROMPT_TOKENS.inc(cached)
        metrics.FINISHED.labels(reason.value).inc()
        ttft = (first_at or time.perf_counter()) - enqueued
        yield Completion(
            finish_reason=reason,
            prompt_tokens=len(tokens.prompt),
            completion_tokens=len(out.generated),
            queue_seconds=0.0,  # inside the engine's own scheduler: not seen from here
            prefill_seconds=ttft,
            decode_seconds=last_at - first_at if out.generated else 0.0,
            message=message,
            cached_prompt_tokens=cached,
        )


def _followed(generated: list[int], forced: list[int], reason: FinishReason) -> bool:
    """Whether an engine kept to the forced completion: its output a prefix
    of it, ended at its end, at the token limit or on a stop string (or cut
    short by an abort or an error, which are reported as such)."""
    if reason in (FinishReason.ERROR, FinishReason.ABORTED):
        return True
    ends = (FinishReason.FORCED_END, FinishReason.LENGTH, FinishReason.STOP_STRING)
    return generated == forced[: len(generated)] and reason in ends
