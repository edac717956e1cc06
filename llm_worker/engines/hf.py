"""The decode engine: continuous batching on one model thread.

All running requests decode together, one token each per forward pass. A
request that arrives is prefilled on its own (reusing a cached prefix when an
earlier round left one) and joins the batch at the next step; a request that
ends, is cancelled or is aborted leaves it at the next step, so its slot and
KV cache are freed at once (see kv_batch.py for how rows join and leave).

The model runs in its own thread so the gRPC event loop stays responsive.
Each request's output goes through an asyncio queue whose fill the engine
bounds: a request whose reader falls `max_queue` items behind is parked (its
KV cache set aside, its row out of the batch) until the reader catches up, so
a slow reader neither grows memory nor slows the other requests.

A failure ends only the request that caused it: a row whose sampling fails
ends with ERROR and the others decode on; when a batched forward pass fails,
each row is retried alone. Prompts are tokenized in a worker thread, never on
the event loop or the model thread.

Sampling is per request (temperature, top-p, top-k, seed). Forced decoding is
a benchmark feature: the request carries its completion, and each of its
tokens still costs a real decode step in the shared batch.
"""

from __future__ import annotations

import asyncio
import collections
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import structlog
import torch
from transformers import DynamicCache

from conveyor_common.types import FinishReason, Message
from llm_worker import metrics
from llm_worker.config import DECODE_ATTENTIONS, DECODE_STEPS, PREFILL_CHUNK
from llm_worker.decode_step import DecodeStep, decode_step_for
from llm_worker.engines.base import (
    Completion,
    Delta,
    EngineInfo,
    GenerationRequest,
    RequestError,
)
from llm_worker.engines.output import TokenOutput, TokenRules
from llm_worker.engines.prefill_order import bring_cheapest_forward, may_go_first
from llm_worker.engines.prepare import Tokenized, tokenize
from llm_worker.kv_batch import KVBatch, growing_cache, supports_batching
from llm_worker.prefix_cache import PrefixCache
from llm_worker.prompt import prompt_ids
from llm_worker.sampling import greedy, make_generator, next_token
from llm_worker.tool_format import check_tool_format

log = structlog.get_logger("engine")

# How far down the waiting line a padded prefill looks for prompts to share it.
_GROUP_LOOKAHEAD = 64

# The longest an idle engine holds its first request for others still being
# tokenized (a burst's), before it prefills what it has.
_BURST_WAIT_S = 0.05

# Finish reasons after which a sequence's cache is worth keeping for a next round.
_REUSABLE = {
    FinishReason.STOP,
    FinishReason.LENGTH,
    FinishReason.STOP_STRING,
    FinishReason.FORCED_END,
}


@dataclass(frozen=True)
class EngineStats:
    rows: int  # in the decode batch
    parked: int  # waiting for a slow reader
    waiting: int  # not yet prefilled
    kv_bytes: int  # the batch's KV cache
    prefix_cache_entries: int
    prefix_cache_tokens: int


@dataclass
class _Stream:
    """The asyncio side of a request. `sent` and `taken` count items across
    the two threads; their difference is what the reader has not taken yet."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    sent: int = 0
    taken: int = 0

    def backlog(self) -> int:
        return self.sent - self.taken


@dataclass
class _Sequence:
    """One request as the model thread sees it."""

    request_id: str
    request: GenerationRequest
    stream: _Stream
    enqueued_at: float
    prompt: list[int] = field(default_factory=list)  # set once tokenized
    out: TokenOutput | None = None  # set once tokenized
    stop: threading.Event = field(default_factory=threading.Event)
    stop_reason: FinishReason = FinishReason.CANCELLED
    generator: torch.Generator | None = None
    queue_seconds: float = 0.0
    prefill_seconds: float = 0.0
    cached_tokens: int = 0
    prefill_saved: float = 0.0
    first_token_at: float = 0.0
    last_token_at: float = 0.0
    parked_kv: KVBatch | None = None
    # A prompt prefilled in chunks: the KV of its first `prefilled` tokens.
    partial: DynamicCache | None = None
    prefilled: int = 0
    overtaken: int = 0  # times a later request was prefilled ahead of it (prefill_order)
    left_to_prefill: int | None = None  # its prompt less a cached prefix, once looked up
    done: bool = False

    @property
    def generated(self) -> list[int]:
        return self.out.generated if self.out is not None else []


class HfEngine:
    """The in-process engine on transformers: `--engine hf`, the default."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        label: str = "",
        default_max_new_tokens: int = 512,
        max_queue: int = 64,
        max_batch: int = 16,
        prefix_cache_tokens: int = 16384,
        prefill_threads: int = 0,
        prefill_chunk: int = PREFILL_CHUNK,
        tool_call_format: str = "",
        decode_step: str = DECODE_STEPS[0],
        decode_attention: str = DECODE_ATTENTIONS[0],
        cache_dir: str = "",
    ):
        self.model = model.eval()
        # Every decode step goes through this (llm_worker/decode_step.py).
        self._decode: DecodeStep = decode_step_for(
            self.model, decode_step, decode_attention, cache_dir
        )
        self.tokenizer = tokenizer
        # With accelerate's device_map the inputs go where the embeddings are.
        self.device = model.get_input_embeddings().weight.device
        self.dtype = next(model.parameters()).dtype
        self.default_max_new_tokens = default_max_new_tokens
        self.max_queue = max_queue
        self.max_batch = max(1, max_batch)
        self.prefix_cache = PrefixCache(prefix_cache_tokens)
        self.max_context = int(getattr(model.config, "max_position_embeddings", 0) or 2048)
        # The format the model writes tool calls in ("" unknown). Its delimiter
        # tokens stream as text although special; every other special token is hidden.
        check_tool_format(tool_call_format)
        self.tool_call_format = tool_call_format
        self._rules = TokenRules.of(
            tokenizer, tool_call_format, getattr(model, "generation_config", None), model.config
        )
        self.label = label
        self._inbox: queue.Queue[_Sequence | None] = queue.Queue()
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._tokenizing = 0  # requests being tokenized (written on the event loop only)
        self._rows: list[_Sequence] = []  # in batch order
        self._parked: list[_Sequence] = []
        self._kv: KVBatch | None = None  # the rows' KV, but for the joining (see _join)
        self._joining: list[KVBatch] = []
        self._active: dict[str, _Sequence] = {}  # by request id, until the handler leaves
        self._prefill_s_per_token = 0.0  # measured on cold prefills
        # Prefill is compute-bound and gains from every core even where decode
        # steps run on fewer (--threads); 0 keeps decode's count.
        self.prefill_threads = prefill_threads
        # Prompt tokens prefilled per iteration while other requests decode
        # (0: no limit): a long prompt goes in chunks and a burst of arrivals
        # in batches of about this many tokens, with a decode step between.
        self.prefill_chunk = prefill_chunk
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._started = False

    # ---- lifecycle -------------------------------------------------------

    def start(self) -> None:
        if not self._started:
            self._thread.start()
            self._started = True

    def stop(self) -> None:
        for seq in list(self._active.values()):
            seq.stop_reason = FinishReason.ABORTED
            seq.stop.set()
        if self._started:
            self._inbox.put(None)
            self._thread.join(timeout=10)
            self._started = False

    def warm_up(self) -> None:
        """One prefill and one batched step so the first request pays no lazy
        init; also learns whether the model's cache can be batched."""
        ids = prompt_ids(self.tokenizer, [Message("user", "Hi")], [])
        with torch.inference_mode():
            for _ in range(2):  # the second prefill, past lazy init, sets the cost estimate
                start = time.perf_counter()
                out = self.model(input_ids=torch.tensor([ids], device=self.device), use_cache=True)
                self._prefill_s_per_token = (time.perf_counter() - start) / len(ids)
            if not supports_batching(out.past_key_values):
                log.warning(
                    "this model's cache cannot be batched (sliding window or recurrent "
                    "layers); decoding one request at a time, without prefix reuse"
                )
                self.max_batch = 1
                self.prefix_cache.max_tokens = 0
                return
            kv = KVBatch.single(out.past_key_values)
            kv = KVBatch.concat([kv, kv.select([0])])
            token = out.logits[:, -1:].argmax(-1).repeat(2, 1)
            self._forward_step(kv, token)

    @property
    def running(self) -> int:
        """Requests whose handler is still streaming."""
        return len(self._active)

    @property
    def info(self) -> EngineInfo:
        return EngineInfo(
            model=self.label,
            device=str(self.device),
            dtype=str(self.dtype).removeprefix("torch."),
            max_context=self.max_context,
            tool_call_format=self.tool_call_format,
            engine="hf",
        )

    async def healthy(self) -> bool:
        return self._started and self._thread.is_alive()

    def stats(self) -> EngineStats:
        kv = self._kv
        return EngineStats(
            rows=len(self._rows),
            parked=len(self._parked),
            waiting=len(self._waiting) + self._inbox.qsize(),
            kv_bytes=(kv.nbytes() if kv is not None else 0)
            + sum(j.nbytes() for j in self._joining),
            prefix_cache_entries=len(self.prefix_cache),
            prefix_cache_tokens=self.prefix_cache.tokens,
        )

    # ---- public API (event loop side) ------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta | Completion]:
        """Streams deltas, then one Completion. Leaving the iterator early
        (a dropped stream) stops the request at its next step."""
        request_id = request.request_id or uuid.uuid4().hex
        if request_id in self._active:
            raise RequestError(f"request_id {request_id!r} is already running")
        seq = self._new_sequence(request_id, request)
        self._active[request_id] = seq  # from here an Abort finds it
        stream = seq.stream
        try:
            # A long prompt takes seconds to tokenize: not on the event loop,
            # nor on the model thread (the fast tokenizer releases the GIL).
            self._tokenizing += 1  # an idle engine waits briefly for these (_take_arrivals)
            try:
                tokens = await asyncio.to_thread(self.tokenize, request)
                seq.prompt = tokens.prompt
                seq.out = TokenOutput(
                    self.tokenizer,
                    self._rules,
                    limit=tokens.limit,
                    stop=request.sampling.stop,
                    forced=tokens.forced,
                )
            finally:
                self._tokenizing -= 1
            self._inbox.put(seq)
            while True:
                item = await stream.queue.get()
                stream.taken += 1
                yield item
                if isinstance(item, Completion):
                    return
        finally:
            seq.stop.set()  # a no-op once finished; CANCELLED if the reader left early
            self._active.pop(request_id, None)

    def abort(self, request_id: str) -> bool:
        seq = self._active.get(request_id)
        if seq is None or seq.done:
            return False
        seq.stop_reason = FinishReason.ABORTED
        seq.stop.set()
        return True

    def tokenize(self, request: GenerationRequest) -> Tokenized:
        return tokenize(self.tokenizer, request, self.max_context, self.default_max_new_tokens)

    def _new_sequence(self, request_id: str, request: GenerationRequest) -> _Sequence:
        return _Sequence(
            request_id=request_id,
            request=request,
            stream=_Stream(loop=asyncio.get_running_loop()),
            enqueued_at=time.perf_counter(),
            generator=make_generator(request.sampling, self.device),
        )

    # ---- model thread ----------------------------------------------------

    def _loop(self) -> None:
        with torch.inference_mode():
            while self._take_arrivals():
                try:
                    self._drop_stopped()
                    self._unpark()
                    self._admit()
                    if self._rows:
                        self._step()
                except Exception as e:  # a last resort: steps end their own failed rows
                    log.exception("engine step failed")
                    self._fail_batch(_describe(e))
                metrics.RUNNING.set(len(self._rows) + len(self._parked))
                metrics.WAITING.set(len(self._waiting))
            for seq in [*self._waiting, *self._rows, *self._parked]:
                self._finish(seq, FinishReason.ABORTED)

    def _take_arrivals(self) -> bool:
        """Moves new requests to the waiting line; False once the engine is
        stopping. With nothing to decode it sleeps until one arrives (waking
        every few ms while parked requests wait on their readers), then waits
        up to `_BURST_WAIT_S` for requests still being tokenized: a burst's
        first prefill then sees all of it, and `prefill_order` puts its
        shortest prompts first (the rest of a burst arrived ~0.4 s late
        otherwise, behind the first prefill, on the 2-core Xeon)."""
        try:
            if not (self._rows or self._waiting):
                if not self._arrived(self._inbox.get(timeout=0.005 if self._parked else None)):
                    return False
                if not self._parked and not self._wait_for_burst():
                    return False
            while True:  # until the inbox is empty (queue.Empty) or stopping
                if not self._arrived(self._inbox.get_nowait()):
                    return False
        except queue.Empty:
            return True

    def _wait_for_burst(self) -> bool:
        """Takes arrivals while requests are being tokenized, for at most
        `_BURST_WAIT_S`; False once the engine is stopping. It polls, so a
        tokenization that fails (nothing arrives) ends the wait too."""
        deadline = time.perf_counter() + _BURST_WAIT_S
        while self._tokenizing > 0 and (left := deadline - time.perf_counter()) > 0:
            try:
                if not self._arrived(self._inbox.get(timeout=min(left, 0.005))):
                    return False
            except queue.Empty:
                continue
        return True

    def _arrived(self, item: _Sequence | None) -> bool:
        """Puts an arrival in the waiting line; False for the stop sentinel."""
        if item is None:
            return False
        self._waiting.append(item)
        return True

    def _drop_stopped(self) -> None:
        """Ends cancelled and aborted requests wherever they are."""
        for seq in [s for s in self._waiting if s.stop.is_set()]:
            self._waiting.remove(seq)
            self._finish(seq, seq.stop_reason)
        for seq in [s for s in self._parked if s.stop.is_set()]:
            self._parked.remove(seq)
            self._finish(seq, seq.stop_reason)
        stopped = [i for i, s in enumerate(self._rows) if s.stop.is_set()]
        for i in stopped:
            self._finish(self._rows[i], self._rows[i].stop_reason)
        if stopped:
            self._keep_rows([i for i in range(len(self._rows)) if i not in set(stopped)])

    def _unpark(self) -> None:
        ready = [s for s in self._parked if s.stream.backlog() < self.max_queue]
        for seq in ready:
            self._join(seq, seq.parked_kv)  # first: if it fails, the sequence is still parked
            self._parked.remove(seq)
            seq.parked_kv = None

    def _admit(self) -> None:
        """Prefills waiting requests, the least prompt left first (see
        `prefill_order`). While other requests decode, one iteration prefills
        about `prefill_chunk` prompt tokens and then lets them step: a long
        prompt goes in chunks over several iterations, and cold prompts that
        fit together share one forward."""
        spent = 0
        while self._waiting and len(self._rows) + len(self._parked) < self.max_batch:
            limit = self.prefill_chunk if self.prefill_chunk > 0 and self._rows else None
            bring_cheapest_forward(
                self._waiting, self._left_to_prefill, self.max_batch, _GROUP_LOOKAHEAD
            )
            head = self._waiting[0]
            left = self._left_to_prefill(head)
            if limit is not None and spent and left > limit - spent:
                break  # the rows step first; the rest next iteration
            group = self._cold_group(limit - spent if limit else None)
            try:
                if group:
                    spent += self._prefill_together(group)
                    continue
                spent += self._prefill_part(head, left if limit is None else limit - spent)
            except Exception as e:  # its prefill or first token failed: it alone ends
                if self._waiting and self._waiting[0] is head:
                    self._waiting.popleft()
                self._fail(head, e, "prefill failed")

    def _cold_group(self, budget: int | None) -> list[_Sequence]:
        """The head of the waiting line and the waiting requests that can
        share its padded prefill: none started, none worth its cached prefix,
        all within `budget` padded tokens (or `prefill_chunk` when idle).
        A padded forward pays for its longest prompt on every row, so the
        head's company is picked nearest in length first (among the next
        `_GROUP_LOOKAHEAD`), not in arrival order. Fewer than two: [] (alone)."""
        cap = budget if budget is not None else self.prefill_chunk
        room = self.max_batch - len(self._rows) - len(self._parked)
        head = self._waiting[0]
        if not cap or room < 2 or head.partial is not None or self._worth_reusing(head):
            return []
        others = may_go_first(self._waiting, self.max_batch, 1, 1 + _GROUP_LOOKAHEAD)
        others.sort(key=lambda s: abs(len(s.prompt) - len(head.prompt)))
        group, width = [head], len(head.prompt)
        for seq in others:
            if len(group) == room:
                break
            fits = max(width, len(seq.prompt)) * (len(group) + 1) <= cap
            # The prefix-cache lookup last: only for a prompt that would fit.
            if fits and seq.partial is None and not self._worth_reusing(seq):
                group.append(seq)
                width = max(width, len(seq.prompt))
        return group if len(group) > 1 else []

    def _left_to_prefill(self, seq: _Sequence) -> int:
        """Its prompt's tokens still to prefill: past its chunks so far once
        begun; before that, those not in the prefix cache (a next round's few
        new tokens), looked up once (an entry stored or dropped later only
        shifts its place in line)."""
        if seq.prefilled:
            return len(seq.prompt) - seq.prefilled
        if seq.left_to_prefill is None:
            seq.left_to_prefill = len(seq.prompt) - self.prefix_cache.lookup(seq.prompt)[0]
        return seq.left_to_prefill

    def _worth_reusing(self, seq: _Sequence) -> bool:
        """Whether a cached prefix covers enough of the prompt (a later round's)
        to prefill it alone on that cache; a few shared tokens, such as the
        chat template's system prompt, are cheaper to recompute in a batch."""
        return self.prefix_cache.lookup(seq.prompt)[0] > len(seq.prompt) // 4

    def _prefill_together(self, group: list[_Sequence]) -> int:
        """One left-padded forward over several whole prompts; each row then
        goes on exactly as a lone prefill would. Returns the padded tokens."""
        for seq in group:
            self._waiting.remove(seq)
            self._dequeued(seq)
        width = max(len(s.prompt) for s in group)
        ids = torch.zeros((len(group), width), dtype=torch.long, device=self.device)
        mask = torch.zeros_like(ids)
        for i, seq in enumerate(group):
            ids[i, width - len(seq.prompt) :] = torch.tensor(seq.prompt, device=self.device)
            mask[i, width - len(seq.prompt) :] = 1
        start = time.perf_counter()
        try:
            with torch_threads(self.prefill_threads):
                out = self.model(
                    input_ids=ids,
                    attention_mask=mask,
                    position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                    use_cache=True,
                    logits_to_keep=1,
                )
        except Exception:  # retried one by one, so only a prompt that fails alone ends
            log.exception("batched prefill failed; prefilling each request alone")
            self._waiting.extendleft(reversed(group))
            for seq in group:
                try:
                    self._prefill_part(seq, len(seq.prompt))
                except Exception as e:
                    if self._waiting and self._waiting[0] is seq:
                        self._waiting.popleft()
                    self._fail(seq, e, "prefill failed")
            return sum(len(s.prompt) for s in group)
        seconds = time.perf_counter() - start
        cache = out.past_key_values
        kv = KVBatch(growing_cache([(la.keys, la.values) for la in cache.layers]), mask)
        for i, seq in enumerate(group):
            seq.prefill_seconds = seconds
            metrics.PROMPT_TOKENS.inc(len(seq.prompt))
            try:
                self._prefilled(seq, kv.select([i]), out.logits[i : i + 1, -1])
            except Exception as e:
                self._fail(seq, e, "prefill failed")
        self._learn_prefill_rate(seconds, sum(len(s.prompt) for s in group))
        return width * len(group)

    def _prefill_part(self, seq: _Sequence, tokens: int) -> int:
        """Prefills the next `tokens` of the head's prompt (after any cached
        prefix); once the prompt is done, the request goes on. Returns the
        tokens run."""
        if seq.partial is None and seq.prefilled == 0:
            self._dequeued(seq)
            reused, entry = self.prefix_cache.lookup(seq.prompt)
            reused = min(reused, len(seq.prompt) - 1)  # at least one token gives the logits
            if entry is not None and reused > 0:
                seq.partial, seq.prefilled = entry.copy_prefix(reused), reused
                seq.cached_tokens = reused
                seq.prefill_saved = reused * self._prefill_s_per_token
                metrics.CACHED_PROMPT_TOKENS.inc(reused)
                metrics.PREFILL_SECONDS_SAVED.inc(seq.prefill_saved)
        end = min(len(seq.prompt), seq.prefilled + max(1, tokens))
        piece = seq.prompt[seq.prefilled : end]
        start = time.perf_counter()
        with torch_threads(self.prefill_threads):
            out = self.model(
                input_ids=torch.tensor([piece], device=self.device),
                past_key_values=seq.partial,
                use_cache=True,
                logits_to_keep=1,
            )
        seq.prefill_seconds += time.perf_counter() - start
        seq.partial, seq.prefilled = out.past_key_values, end
        if end < len(seq.prompt):
            return len(piece)  # more chunks to come; it stays at the head
        self._waiting.popleft()
        if not seq.cached_tokens:  # a cold prefill keeps the per-token estimate current
            self._learn_prefill_rate(seq.prefill_seconds, len(seq.prompt))
        metrics.PROMPT_TOKENS.inc(len(seq.prompt))
        kv, seq.partial = KVBatch.single(seq.partial), None
        self._prefilled(seq, kv, out.logits[:, -1])
        return len(piece)

    def _dequeued(self, seq: _Sequence) -> None:
        """Its wait in the queue ends with its first prefill (counted once,
        also when a failed batched prefill hands it back to prefill alone)."""
        if not seq.queue_seconds:
            seq.queue_seconds = time.perf_counter() - seq.enqueued_at
            metrics.QUEUE_TIME.observe(seq.queue_seconds)

    def _learn_prefill_rate(self, seconds: float, tokens: int) -> None:
        """Folds a cold prefill's cost per token into the running estimate
        (what `prefill_seconds_saved` is reckoned with)."""
        self._prefill_s_per_token = 0.8 * self._prefill_s_per_token + 0.2 * seconds / tokens

    def _prefilled(self, seq: _Sequence, kv: KVBatch, logits: torch.Tensor) -> None:
        """A prompt is in `kv`: its first token, then it ends, parks or joins."""
        if seq.out.forced == []:
            self._finish(seq, FinishReason.FORCED_END)
            return
        reason = self._advance(seq, self._choose(seq, logits[0], int(greedy(logits[0]))))
        if reason is not None:
            self._store_prefix(seq, kv, 0)
            self._finish(seq, reason)
        elif seq.stream.backlog() >= self.max_queue:
            seq.parked_kv = kv
            self._parked.append(seq)
        else:
            self._join(seq, kv)

    def _join(self, seq: _Sequence, kv: KVBatch) -> None:
        """Its row is in the batch from the next step on. Its KV joins then,
        with every row that joined since the last step, in one concat: a
        burst of arrivals copies the batch once, not once per arrival."""
        self._rows.append(seq)
        self._joining.append(kv)

    def _batch(self) -> KVBatch | None:
        """The running batch's KV with every joined row in (see `_join`)."""
        if self._joining:
            parts = [self._kv, *self._joining] if self._kv is not None else self._joining
            self._kv = KVBatch.concat(parts)
            self._joining = []
        return self._kv

    def _keep_rows(self, keep: list[int]) -> None:
        kv = self._batch()
        self._rows = [self._rows[i] for i in keep]
        self._kv = kv.select(keep) if kv is not None else None

    def _forward_step(self, kv: KVBatch, tokens: torch.Tensor) -> torch.Tensor:
        """One decode step of every row: feeds `tokens` ([rows, 1]) and returns
        the next-token logits ([rows, vocab])."""
        logits = self._decode(tokens, kv.lengths()[:, None], kv.cache, kv.step_mask())
        kv.grew()
        return logits

    def _step(self) -> None:
        metrics.BATCH_SIZE.observe(len(self._rows))
        logits = self._step_logits()
        rows = self._rows
        best = greedy(logits).tolist() if rows else []
        keep, park = [], []
        for i, seq in enumerate(rows):
            try:
                reason = self._advance(seq, self._choose(seq, logits[i], best[i]))
                if reason is not None:
                    self._store_prefix(seq, self._kv, i)
                    self._finish(seq, reason)
                elif seq.stream.backlog() >= self.max_queue:
                    seq.parked_kv = self._kv.row_prefix(i, int(self._kv.mask[i].sum()))
                    park.append(seq)
                else:
                    keep.append(i)
            except Exception as e:  # its sampling or output failed: the others go on
                self._fail(seq, e, "decode step failed for one request")
        if len(keep) < len(rows):
            self._keep_rows(keep)
            self._parked.extend(park)

    def _step_logits(self) -> torch.Tensor | None:
        """Every row's next-token logits. When the batched pass fails, each row
        is retried alone and only the rows that fail alone end (ERROR), so one
        bad request cannot end its neighbours'. None when no row is left."""
        fed = torch.tensor([[s.generated[-1]] for s in self._rows], device=self.device)
        kv = self._batch()  # a failure here is the whole batch's (out of memory)
        try:
            return self._forward_step(kv, fed)
        except Exception as e:
            if len(self._rows) == 1:
                self._fail(self._rows[0], e, "decode step failed")
                self._rows, self._kv = [], None
                return None
            log.exception("batched decode step failed; retrying each request alone")
        _drop_partial_step(self._kv)
        rows, kvs, logits = [], [], []
        for i, seq in enumerate(self._rows):
            one = self._kv.select([i])
            try:
                logits.append(self._forward_step(one, fed[i : i + 1]))
            except Exception as e:
                self._fail(seq, e, "decode step failed")
                continue
            rows.append(seq)
            kvs.append(one)
        self._rows = rows
        self._kv = KVBatch.concat(kvs) if kvs else None
        return torch.cat(logits) if logits else None

    def _choose(self, seq: _Sequence, logits: torch.Tensor, best: int) -> int:
        """The row's next token: forced, greedy (`best`, found for the whole
        batch at once), or sampled with its own parameters and generator."""
        if seq.out.forced is not None:
            return seq.out.next_forced()
        if seq.generator is None:
            return best
        return next_token(logits, seq.request.sampling, seq.generator)

    def _advance(self, seq: _Sequence, token: int) -> FinishReason | None:
        """Takes a sequence's next token (see TokenOutput.push) and emits its
        text; returns why the sequence ends here, or None to go on."""
        taken = len(seq.generated)
        delta, reason = seq.out.push(token)
        if len(seq.generated) > taken:
            now = time.perf_counter()
            if taken == 0:
                seq.first_token_at = now
                metrics.TIME_TO_FIRST_TOKEN.observe(now - seq.enqueued_at)
            else:
                metrics.INTER_TOKEN_LATENCY.observe(now - seq.last_token_at)
            seq.last_token_at = now
        if delta is not None:
            self._emit(seq, delta)
        return reason

    def _store_prefix(self, seq: _Sequence, kv: KVBatch, row: int) -> None:
        """Keeps the tokens the cache holds (the prompt and every fed token)."""
        if self.prefix_cache.max_tokens <= 0:
            return
        held = int(kv.mask[row].sum())
        self.prefix_cache.store((seq.prompt + seq.generated)[:held], kv.row_prefix(row, held))

    def _finish(self, seq: _Sequence, reason: FinishReason, message: str = "") -> None:
        if seq.done:
            return
        if reason not in (FinishReason.CANCELLED, FinishReason.ERROR) and seq.out is not None:
            tail = seq.out.flush()  # may fail: then the caller ends it with ERROR
            if tail is not None:
                self._emit(seq, tail)
        seq.done = True
        decode_s = seq.last_token_at - seq.first_token_at if seq.generated else 0.0
        # Counted before the Completion goes out, so a client that saw it sees them too.
        metrics.GENERATED_TOKENS.inc(len(seq.generated))
        metrics.FINISHED.labels(reason.value).inc()
        self._emit(
            seq,
            Completion(
                finish_reason=reason,
                prompt_tokens=len(seq.prompt),
                completion_tokens=len(seq.generated),
                queue_seconds=seq.queue_seconds,
                prefill_seconds=seq.prefill_seconds,
                decode_seconds=decode_s,
                message=message,
                cached_prompt_tokens=seq.cached_tokens,
                prefill_seconds_saved=seq.prefill_saved,
            ),
        )

    def _fail(self, seq: _Sequence, error: Exception, what: str) -> None:
        """Ends one request with ERROR; called in the `except` that caught `error`."""
        log.exception(what, request=seq.request_id)
        self._finish(seq, FinishReason.ERROR, message=_describe(error))

    def _fail_batch(self, message: str) -> None:
        """Ends every request the engine holds past prefill (not the waiting)."""
        for seq in [*self._rows, *self._parked]:
            self._finish(seq, FinishReason.ERROR, message=message)
        self._rows, self._parked, self._kv, self._joining = [], [], None, []

    def _emit(self, seq: _Sequence, item: Delta | Completion) -> None:
        """Hands an item to the request's stream without blocking the batch
        (the backlog bound is enforced by parking, above)."""
        seq.stream.sent += 1
        try:
            seq.stream.loop.call_soon_threadsafe(seq.stream.queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone: nobody will read this
            seq.stop.set()


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Runs the block on `n` CPU kernel threads (0: as they are). torch keeps
    the count per calling thread, so the engine thread switches its own."""
    before = torch.get_num_threads()
    if not n or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _drop_partial_step(kv: KVBatch) -> None:
    """A forward pass that failed part-way may have appended a column to some
    layers and not to others: those columns go, back to what the mask says."""
    for layer in kv.cache.layers:
        extra = layer.get_seq_length() - kv.columns
        if extra > 0:
            layer.crop(-extra)


def _describe(error: Exception) -> str:
    return f"{type(error).__name__}: {error}"


def build_hf_engine(config) -> HfEngine:
    """Loads the model, warms it up and starts decoding, all on one new
    thread, the engine's (blocking until it is warm). One thread for every
    torch call means one OpenMP pool: loading or warming up on another
    thread (asyncio.to_thread, say) left the process with two, and decoding
    ran ~40 % slower for it."""
    from llm_worker.loader import load
    from llm_worker.tool_format import choose_tool_format

    built: dict = {}
    ready = threading.Event()

    def boot() -> None:
        try:
            model, tokenizer, label = load(config)
            engine = HfEngine(
                model,
                tokenizer,
                label=label,
                default_max_new_tokens=config.max_new_tokens,
                max_queue=config.max_queue,
                max_batch=config.max_batch,
                prefix_cache_tokens=config.prefix_cache_tokens,
                prefill_threads=config.prefill_threads,
                prefill_chunk=config.prefill_chunk,
                tool_call_format=choose_tool_format(tokenizer, config.tool_call_format, label),
                decode_step=config.decode_step,
                decode_attention=config.decode_attention,
                cache_dir=config.cache_dir,
            )
            engine.warm_up()
            built["engine"] = engine
        except BaseException as e:  # handed to the caller, raised there
            built["error"] = e
            return
        finally:
            ready.set()
        engine._loop()

    thread = threading.Thread(target=boot, name="engine", daemon=True)
    thread.start()
    ready.wait()
    if "error" in built:
        raise built["error"]
    engine = built["engine"]
    engine._thread, engine._started = thread, True  # this thread is its engine thread
    return engine
