"""The decode engine: one model thread that runs requests step by step.

The model runs in its own thread so the gRPC event loop stays responsive.
Each request gets a bounded asyncio queue for its output; the model thread
blocks on a full queue (backpressure: a slow reader cannot grow memory) but
checks the request's cancel flag while it waits, and before every decode
step, so a dropped stream or an Abort stops work within one step.

This engine decodes one request at a time; requests wait in arrival order.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import structlog
import torch

from conveyor_common.types import FinishReason, Message, Sampling, ToolDef
from llm_worker.detokenizer import IncrementalDetokenizer
from llm_worker.prompt import prompt_ids
from llm_worker.sampling import make_generator, next_token

log = structlog.get_logger("engine")


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


class RequestError(ValueError):
    """A request the engine cannot run as given (a client error)."""


@dataclass
class _Active:
    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    enqueued_at: float
    stop: threading.Event = field(default_factory=threading.Event)
    stop_reason: FinishReason = FinishReason.CANCELLED
    queue_seconds: float = 0.0
    reader_gone: threading.Event = field(default_factory=threading.Event)


class Engine:
    def __init__(self, model, tokenizer, *, default_max_new_tokens: int = 512, max_queue: int = 64):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.default_max_new_tokens = default_max_new_tokens
        self.max_queue = max_queue
        self.max_context = int(getattr(model.config, "max_position_embeddings", 0) or 2048)
        self._eos_ids = _eos_ids(model, tokenizer)
        self._pending: queue.Queue[_Active | None] = queue.Queue()
        self._active: dict[str, _Active] = {}
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._started = False

    # ---- lifecycle -------------------------------------------------------

    def start(self) -> None:
        if not self._started:
            self._thread.start()
            self._started = True

    def stop(self) -> None:
        for active in list(self._active.values()):
            active.stop_reason = FinishReason.ABORTED
            active.stop.set()
        if self._started:
            self._pending.put(None)
            self._thread.join(timeout=10)
            self._started = False

    def warm_up(self) -> None:
        """One short greedy generation so the first request pays no lazy init."""
        ids = prompt_ids(self.tokenizer, [Message("user", "Hi")], [])
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([ids], device=self.device), use_cache=True)
            self.model(
                input_ids=out.logits[:, -1:].argmax(-1),
                past_key_values=out.past_key_values,
                use_cache=True,
            )

    @property
    def running(self) -> int:
        """Requests admitted and not yet finished (waiting ones included)."""
        return len(self._active)

    # ---- public API ------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta | Completion]:
        """Streams deltas, then one Completion. Leaving the iterator early
        (a dropped stream) stops the request at its next step."""
        request_id = request.request_id or uuid.uuid4().hex
        if request_id in self._active:
            raise RequestError(f"request_id {request_id!r} is already running")
        if not request.messages:
            raise RequestError("messages must not be empty")
        active = _Active(
            request=request,
            loop=asyncio.get_running_loop(),
            out=asyncio.Queue(maxsize=self.max_queue),
            enqueued_at=time.perf_counter(),
        )
        self._active[request_id] = active
        self._pending.put(active)
        try:
            while True:
                item = await active.out.get()
                yield item
                if isinstance(item, Completion):
                    return
        finally:
            active.reader_gone.set()
            active.stop.set()
            self._active.pop(request_id, None)

    def abort(self, request_id: str) -> bool:
        active = self._active.get(request_id)
        if active is None:
            return False
        active.stop_reason = FinishReason.ABORTED
        active.stop.set()
        return True

    # ---- model thread ----------------------------------------------------

    def _loop(self) -> None:
        while True:
            active = self._pending.get()
            if active is None:
                return
            if active.stop.is_set():
                self._emit(active, self._finished(active, active.stop_reason, 0, 0, 0.0, 0.0))
                continue
            try:
                completion = self._run(active)
            except RequestError as e:
                completion = self._finished(active, FinishReason.ERROR, 0, 0, 0.0, 0.0, str(e))
            except Exception as e:  # a model failure ends this request, not the engine
                log.exception("generation failed")
                completion = self._finished(
                    active, FinishReason.ERROR, 0, 0, 0.0, 0.0, f"{type(e).__name__}: {e}"
                )
            self._emit(active, completion)

    def _finished(self, active, reason, prompt_n, gen_n, prefill_s, decode_s, message=""):
        return Completion(
            finish_reason=reason,
            prompt_tokens=prompt_n,
            completion_tokens=gen_n,
            queue_seconds=active.queue_seconds,
            prefill_seconds=prefill_s,
            decode_seconds=decode_s,
            message=message,
        )

    def _emit(self, active: _Active, item) -> bool:
        """Hands an item to the stream; blocks while its queue is full. Returns
        False when the stream went away."""
        future = asyncio.run_coroutine_threadsafe(active.out.put(item), active.loop)
        while True:
            try:
                future.result(timeout=0.05)
                return True
            except TimeoutError:
                if active.reader_gone.is_set():
                    future.cancel()
                    return False
            except (asyncio.CancelledError, RuntimeError):  # loop closed or put cancelled
                return False

    def _run(self, active: _Active) -> Completion:
        req = active.request
        active.queue_seconds = time.perf_counter() - active.enqueued_at
        ids = prompt_ids(self.tokenizer, req.messages, req.tools)
        forced = (
            self.tokenizer.encode(req.forced_completion, add_special_tokens=False)
            if req.forced_completion is not None
            else None
        )
        limit = req.sampling.max_new_tokens or (
            len(forced) if forced is not None else self.default_max_new_tokens
        )
        room = self.max_context - len(ids)
        if room <= 0:
            raise RequestError(
                f"prompt is {len(ids)} tokens; the model's context is {self.max_context}"
            )
        limit = min(limit, room)
        generator = make_generator(req.sampling, self.device)
        detok = IncrementalDetokenizer(self.tokenizer)
        text = ""
        stops = req.sampling.stop
        longest_stop = max((len(s) for s in stops), default=0)
        reason = FinishReason.LENGTH
        n = 0

        with torch.inference_mode():
            start = time.perf_counter()
            out = self.model(input_ids=torch.tensor([ids], device=self.device), use_cache=True)
            cache, logits = out.past_key_values, out.logits[0, -1]
            prefill_s = time.perf_counter() - start
            decode_start = time.perf_counter()
            while True:
                if active.stop.is_set():
                    reason = active.stop_reason
                    break
                if forced is not None and not forced:
                    reason = FinishReason.FORCED_END
                    break
                token = (
                    forced[n] if forced is not None else next_token(logits, req.sampling, generator)
                )
                if forced is None and token in self._eos_ids:
                    reason = FinishReason.STOP
                    break
                n += 1
                delta, delta_ids = detok.push(token)
                if delta:
                    text += delta
                    if not self._emit(active, Delta(delta, delta_ids)):
                        reason = FinishReason.CANCELLED
                        break
                    if stops and any(s in text[-(longest_stop + len(delta)) :] for s in stops):
                        reason = FinishReason.STOP_STRING
                        break
                if forced is not None and n == len(forced):
                    # The last forced token needs no next-token logits.
                    reason = FinishReason.FORCED_END
                    break
                if n >= limit:
                    reason = FinishReason.LENGTH
                    break
                out = self.model(
                    input_ids=torch.tensor([[token]], device=self.device),
                    past_key_values=cache,
                    use_cache=True,
                )
                cache, logits = out.past_key_values, out.logits[0, -1]
            tail, tail_ids = detok.flush()
            if tail and reason is not FinishReason.CANCELLED:
                self._emit(active, Delta(tail, tail_ids))
            decode_s = time.perf_counter() - decode_start
        return self._finished(active, reason, len(ids), n, prefill_s, decode_s)


def _eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return ids
