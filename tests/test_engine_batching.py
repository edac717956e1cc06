"""The worker's continuous batching on the tiny model: batched rows compute
what they would alone, many streams with cancels and aborts end cleanly with
their own text, slow readers are parked, prefixes are reused, and the engine
holds nothing once idle."""

from __future__ import annotations

import asyncio
import random

import grpc
import pytest
import torch
from conveyor.v1 import common_pb2, llm_worker_pb2, llm_worker_pb2_grpc
from prometheus_client import REGISTRY

from conveyor_common.types import Message, Sampling
from llm_worker.engines import Completion, Delta, GenerationRequest
from llm_worker.kv_batch import KVBatch


@pytest.fixture
async def stub(worker):
    _, target = worker
    async with grpc.aio.insecure_channel(target) as channel:
        yield llm_worker_pb2_grpc.LlmWorkerServiceStub(channel)


async def _idle(engine, seconds: float = 10.0) -> None:
    """Waits until the engine holds no request and no batch cache."""
    for _ in range(int(seconds / 0.02)):
        s = engine.stats()
        if engine.running == 0 and s.rows == s.parked == s.waiting == s.kv_bytes == 0:
            return
        await asyncio.sleep(0.02)
    pytest.fail(f"engine not idle: {engine.stats()}, {engine.running} handlers")


def _gen(text: str = "", sampling: Sampling | None = None, forced: str | None = None, rid=""):
    return GenerationRequest(
        messages=[Message("user", text or "Say something.")],
        sampling=sampling or Sampling(),
        forced_completion=forced,
        request_id=rid,
    )


async def _run(engine, request: GenerationRequest) -> tuple[str, list[int], Completion]:
    text, ids, done = "", [], None
    async for item in engine.generate(request):
        if isinstance(item, Delta):
            text += item.text
            ids += item.token_ids
        else:
            done = item
    return text, ids, done


def test_batched_rows_compute_what_they_compute_alone(worker):
    """Rows of different lengths, left-padded into one batch, give the logits
    each gives alone; also after a row leaves and a new one joins."""
    engine, _ = worker
    model = engine.model
    prompts = [
        [5, 17, 300, 42, 9, 11, 800],
        [7, 7, 123],
        [1000, 2000, 3000, 4000, 5, 6, 7, 8, 9, 10],
    ]
    nxt = [[21, 22, 23], [31, 32, 33], [41, 42, 43]]

    def alone(prompt: list[int], feed: list[int]) -> list[torch.Tensor]:
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([prompt]), use_cache=True)
            cache, logits = out.past_key_values, []
            for t in feed:
                out = model(input_ids=torch.tensor([[t]]), past_key_values=cache, use_cache=True)
                logits.append(out.logits[0, -1])
        return logits

    expected = [alone(p, f) for p, f in zip(prompts, nxt, strict=True)]

    def single(prompt: list[int]) -> KVBatch:
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([prompt]), use_cache=True)
        return KVBatch.single(out.past_key_values)

    with torch.inference_mode():
        kv = KVBatch.concat([single(prompts[0]), single(prompts[1])])
        assert kv.padded and kv.rows == 2
        step0 = engine._forward_step(kv, torch.tensor([[nxt[0][0]], [nxt[1][0]]]))
        kv = kv.select([0])  # row 1 leaves: its padding columns go
        assert not kv.padded and kv.columns == len(prompts[0]) + 1
        kv = KVBatch.concat([kv, single(prompts[2])])  # row 2 joins, longer
        step1 = engine._forward_step(kv, torch.tensor([[nxt[0][1]], [nxt[2][0]]]))
    torch.testing.assert_close(step0[0], expected[0][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(step0[1], expected[1][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(step1[0], expected[0][1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(step1[1], expected[2][0], atol=1e-4, rtol=1e-4)


async def test_32_streams_with_cancels_and_aborts_end_cleanly(worker, stub):
    """Forced decoding makes every stream's text checkable: the ones left
    alone get exactly their completion, cancelled and aborted ones a prefix
    of it, and the engine ends idle."""
    engine, _ = worker
    rng = random.Random(4)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    plans = []
    for i in range(32):
        completion = f"stream {i}: " + " ".join(
            rng.choice(words) for _ in range(rng.randint(8, 30))
        )
        fate = rng.choice(["complete", "complete", "cancel", "abort"])
        plans.append((f"s32-{i}", completion, fate, rng.randint(1, 4)))
    plans.append(("s32-sampled", None, "complete", 0))  # an ordinary request in the mix

    async def one(rid: str, completion: str | None, fate: str, after: int):
        request = llm_worker_pb2.GenerateRequest(
            request_id=rid,
            messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=f"Hi {rid}")],
        )
        if completion is not None:
            request.forced_decoding.completion = completion
        else:
            request.sampling.MergeFrom(
                common_pb2.SamplingParams(temperature=0.8, seed=3, max_new_tokens=20)
            )
        call = stub.Generate(request, timeout=120)
        text, deltas, reason = "", 0, None
        async for response in call:
            kind = response.WhichOneof("event")
            if kind == "delta":
                text += response.delta.text
                deltas += 1
                if deltas == after and fate == "cancel":
                    call.cancel()
                    return rid, completion, fate, text, None
                if deltas == after and fate == "abort":
                    await stub.Abort(llm_worker_pb2.AbortRequest(request_id=rid))
            elif kind == "complete":
                reason = response.complete.finish_reason
            else:
                pytest.fail(response.error.message)
        return rid, completion, fate, text, reason

    results = await asyncio.gather(*(one(*p) for p in plans))
    for rid, completion, fate, text, reason in results:
        if completion is None:
            assert text and reason in (
                common_pb2.FINISH_REASON_LENGTH,
                common_pb2.FINISH_REASON_STOP,
            ), rid
        elif fate == "complete":
            assert text == completion and reason == common_pb2.FINISH_REASON_FORCED_END, rid
        else:
            assert completion.startswith(text) and text, rid
            if fate == "abort":
                # The abort may land after the last token; either way it ended.
                assert reason in (
                    common_pb2.FINISH_REASON_ABORTED,
                    common_pb2.FINISH_REASON_FORCED_END,
                ), rid
                if reason == common_pb2.FINISH_REASON_ABORTED:
                    assert text != completion or len(completion) < 40, rid
    await _idle(engine)
    assert sum(f == "abort" for *_, f, _ in plans) and sum(f == "cancel" for *_, f, _ in plans)


async def test_memory_returns_to_its_baseline(worker):
    """After a burst of streams the engine's batch cache is gone and the
    process's memory is back where the previous burst left it."""
    import psutil

    engine, _ = worker
    process = psutil.Process()
    burst = [_gen(f"burst {i}", forced="word " * 120) for i in range(16)]

    async def run_burst():
        await asyncio.gather(*(_run(engine, r) for r in burst))
        await _idle(engine)

    await run_burst()
    baseline = process.memory_info().rss
    for _ in range(2):
        await run_burst()
    assert engine.stats().kv_bytes == 0
    assert engine.prefix_cache.tokens <= engine.prefix_cache.max_tokens
    grown = process.memory_info().rss - baseline
    assert grown < 64 * 1024 * 1024, f"RSS grew by {grown / 2**20:.0f} MiB across two bursts"


async def test_a_slow_reader_is_parked_and_loses_nothing(worker):
    """A reader that stops reading does not grow its queue past the bound nor
    hold up another request; when it reads again it gets every token."""
    engine, _ = worker
    long_text = " ".join(f"w{i}" for i in range(600))
    slow = engine.generate(_gen("slow", forced=long_text))
    received = ""
    first = await slow.__anext__()
    received += first.text
    for _ in range(200):
        if engine.stats().parked == 1:
            break
        await asyncio.sleep(0.02)
    assert engine.stats().parked == 1, engine.stats()
    slow_seq = next(iter(s for s in engine._parked))
    assert slow_seq.stream.backlog() <= engine.max_queue + 1

    fast_text, _, fast_done = await _run(engine, _gen("fast", forced="quick one"))
    assert fast_text == "quick one" and fast_done.finish_reason.value == "FORCED_END"
    assert engine.stats().parked == 1  # still waiting on its reader

    async for item in slow:
        if isinstance(item, Delta):
            received += item.text
        else:
            assert item.finish_reason.value == "FORCED_END"
    assert received == long_text
    await _idle(engine)


async def test_seeded_sampling_is_the_same_alone_and_in_a_batch(worker):
    engine, _ = worker
    seeded = _gen("seeded", Sampling(temperature=1.0, top_p=0.9, seed=11, max_new_tokens=24))
    _, alone, _ = await _run(engine, seeded)
    others = [_gen(f"other {i}", Sampling(temperature=1.0, max_new_tokens=30)) for i in range(5)]
    results = await asyncio.gather(_run(engine, seeded), *(_run(engine, r) for r in others))
    assert results[0][1] == alone and len(alone) > 0


async def test_a_later_round_reuses_the_cached_prefix(worker):
    """Round 2 repeats round 1's prompt and output: it is served from the
    prefix cache, and greedy decoding gives the same tokens as without it."""
    engine, _ = worker
    greedy = Sampling(max_new_tokens=12)
    first = [Message("system", "You are terse."), Message("user", "Count to five.")]
    text, _, done1 = await _run(engine, GenerationRequest(messages=first, sampling=greedy))
    second = [*first, Message("assistant", text), Message("user", "Again, backwards.")]

    budget = engine.prefix_cache.max_tokens
    engine.prefix_cache.max_tokens = 0
    engine.prefix_cache.clear()
    try:
        _, cold_ids, cold = await _run(engine, GenerationRequest(messages=second, sampling=greedy))
    finally:
        engine.prefix_cache.max_tokens = budget
    assert cold.cached_prompt_tokens == 0

    await _run(engine, GenerationRequest(messages=first, sampling=greedy))
    _, warm_ids, warm = await _run(engine, GenerationRequest(messages=second, sampling=greedy))
    assert warm.cached_prompt_tokens >= done1.prompt_tokens
    assert warm.prefill_seconds_saved > 0
    assert warm_ids == cold_ids


async def test_a_later_round_reuses_the_earlier_output_too(worker):
    """With canonical output tokens (forced here; greedy output nearly always
    is), round 2 reuses everything round 1 held in its cache: the prompt and
    every output token but the last, which was never fed. The output opens
    with blank lines, which whole-text tokenization would merge with the
    newline ending the generation prompt."""
    engine, _ = worker
    engine.prefix_cache.clear()
    output = "\n\nFive, four, three, two, one."
    first = [Message("user", "Count down from five.")]
    _, _, done1 = await _run(engine, _gen(first[0].content, forced=output))
    assert done1.completion_tokens > 5
    second = [*first, Message("assistant", output), Message("user", "Now up.")]
    _, _, warm = await _run(
        engine, GenerationRequest(messages=second, sampling=Sampling(max_new_tokens=2))
    )
    assert warm.cached_prompt_tokens == done1.prompt_tokens + done1.completion_tokens - 1


async def test_abort_and_drop_free_the_slot_at_the_next_step(worker, stub):
    engine, _ = worker
    request = llm_worker_pb2.GenerateRequest(
        request_id="free-me",
        messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="x")],
        forced_decoding=common_pb2.ForcedDecoding(completion="tok " * 2000),
    )
    call = stub.Generate(request, timeout=60)
    async for _ in call:
        if engine.stats().rows == 1:
            break
    assert (await stub.Abort(llm_worker_pb2.AbortRequest(request_id="free-me"))).found
    await _idle(engine)
    call.cancel()

    call = stub.Generate(request, timeout=60)
    async for _ in call:
        if engine.stats().rows == 1:
            break
    call.cancel()  # a dropped stream
    await _idle(engine)


async def test_metrics_count_tokens_and_latencies(worker):
    engine, _ = worker

    def sample(name: str) -> float:
        return REGISTRY.get_sample_value(name) or 0.0

    before = sample("conveyor_worker_generation_tokens_total")
    ttft = sample("conveyor_worker_time_to_first_token_seconds_count")
    await _run(engine, _gen("metrics", forced="one two three four"))
    assert sample("conveyor_worker_generation_tokens_total") >= before + 4
    assert sample("conveyor_worker_time_to_first_token_seconds_count") == ttft + 1
    assert sample("conveyor_worker_inter_token_latency_seconds_count") > 0
    assert sample("conveyor_worker_queue_time_seconds_count") > 0
    assert sample("conveyor_worker_num_requests_running") is not None


async def test_prefills_and_decode_steps_run_on_their_own_thread_counts(tiny_model_dir):
    """--threads for decode steps, --prefill-threads for prefills: each forward
    pass sees its count in the engine thread."""
    from llm_worker.config import WorkerConfig
    from llm_worker.engines.hf import build_hf_engine

    before = torch.get_num_threads()
    engine = await asyncio.to_thread(
        build_hf_engine, WorkerConfig(model=str(tiny_model_dir), threads=1, prefill_threads=3)
    )
    seen: list[tuple[int, int]] = []  # (tokens fed, threads)
    _spy_forwards(engine, lambda ids: seen.append((ids.shape[1], torch.get_num_threads())))
    try:
        text, _, _ = await _run(engine, _gen("count threads", forced="one two three"))
        assert text == "one two three"
    finally:
        engine.stop()
        torch.set_num_threads(before)
    prefills = {threads for tokens, threads in seen if tokens > 1}
    steps = {threads for tokens, threads in seen if tokens == 1}
    assert prefills == {3} and steps == {1}, seen


async def test_load_warm_up_prefill_and_decode_all_run_on_the_engine_thread(
    tiny_model_dir, monkeypatch
):
    """One thread makes every torch call, so the process has one OpenMP pool
    (a second thread's calls made a second pool and cost ~40 % of decode)."""
    import threading

    import llm_worker.loader as loader
    from llm_worker.config import WorkerConfig
    from llm_worker.engines.hf import HfEngine, build_hf_engine

    threads: dict[str, set[int]] = {"load": set(), "warm_up": set(), "forward": set()}
    real_load, real_warm_up = loader.load, HfEngine.warm_up

    def load(config):
        threads["load"].add(threading.get_ident())
        return real_load(config)

    def warm_up(self):
        threads["warm_up"].add(threading.get_ident())
        return real_warm_up(self)

    monkeypatch.setattr(loader, "load", load)
    monkeypatch.setattr(HfEngine, "warm_up", warm_up)
    engine = await asyncio.to_thread(build_hf_engine, WorkerConfig(model=str(tiny_model_dir)))
    _spy_forwards(engine, lambda ids: threads["forward"].add(threading.get_ident()))
    try:
        text, _, _ = await _run(engine, _gen("which thread", forced="this one"))
        assert text == "this one"
    finally:
        engine.stop()
    assert threads == dict.fromkeys(threads, {engine._thread.ident}), threads
    assert engine._thread.ident != threading.get_ident()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
async def test_the_engine_batches_on_a_gpu(tiny_model_dir):
    from llm_worker.config import WorkerConfig
    from llm_worker.engines.hf import build_hf_engine

    engine = await asyncio.to_thread(
        build_hf_engine, WorkerConfig(model=str(tiny_model_dir), device="cuda")
    )
    try:
        assert engine.device.type == "cuda"
        texts = [f"gpu stream {i} " + "word " * (10 + i) for i in range(6)]
        results = await asyncio.gather(
            *(_run(engine, _gen(f"g{i}", forced=t)) for i, t in enumerate(texts))
        )
        assert [r[0] for r in results] == texts
        _, a, _ = await _run(
            engine, _gen("s", Sampling(temperature=1.0, seed=5, max_new_tokens=16))
        )
        _, b, _ = await _run(
            engine, _gen("s", Sampling(temperature=1.0, seed=5, max_new_tokens=16))
        )
        assert a == b
    finally:
        engine.stop()


@pytest.fixture(scope="module")
async def f32_engine(tiny_model_dir):
    """A float32 engine of its own (exact comparisons; no prefix cache)."""
    from llm_worker.config import WorkerConfig
    from llm_worker.engines.hf import build_hf_engine

    config = WorkerConfig(model=str(tiny_model_dir), dtype="float32", prefix_cache_tokens=0)
    engine = await asyncio.to_thread(build_hf_engine, config)
    yield engine
    engine.stop()


def _spy_forwards(engine, seen) -> None:
    """Calls `seen(input_ids)` on every forward pass the engine makes: its
    prefills through the model, its decode steps through its decode step."""
    forward, step = engine.model.forward, engine._decode

    def spy_forward(*args, **kwargs):
        seen(kwargs["input_ids"])
        return forward(*args, **kwargs)

    def spy_step(tokens, *rest):
        seen(tokens)
        return step(tokens, *rest)

    engine.model.forward, engine._decode = spy_forward, spy_step


def _forward_shapes(engine, monkeypatch) -> list[tuple[int, int]]:
    """Records the [rows, tokens] of every forward pass the engine makes."""
    shapes: list[tuple[int, int]] = []
    monkeypatch.setattr(engine.model, "forward", engine.model.forward)
    monkeypatch.setattr(engine, "_decode", engine._decode)  # both restored after the test
    _spy_forwards(engine, lambda ids: shapes.append(tuple(ids.shape)))
    return shapes


def _arrive_together(engine, monkeypatch, n: int) -> None:
    """Holds the next `n` requests until all are tokenized, then hands them
    to the engine in one step (under the queue's lock), as a burst would,
    in the order they were made."""
    held = []
    inbox = engine._inbox

    def put(item):
        held.append(item)
        if len(held) == n:
            # In the order the requests were made, not their tokenizers finished.
            made = list(engine._active)
            held.sort(key=lambda seq: made.index(seq.request_id))
            with inbox.mutex:
                inbox.queue.extend(held)
                inbox.not_empty.notify()

    monkeypatch.setattr(inbox, "put", put)


async def test_prompts_that_arrive_together_are_prefilled_together(f32_engine, monkeypatch):
    """One padded forward prefills the burst, and each request's greedy
    output is what it is alone."""
    engine = f32_engine
    requests = [
        _gen(f"Tell me about the number {i}." * (i + 1), Sampling(max_new_tokens=10))
        for i in range(4)
    ]
    alone = [(await _run(engine, r))[1] for r in requests]
    shapes = _forward_shapes(engine, monkeypatch)
    _arrive_together(engine, monkeypatch, len(requests))
    together = await asyncio.gather(*(_run(engine, r) for r in requests))
    assert [ids for _, ids, _ in together] == alone
    prefills = [s for s in shapes if s[1] > 1]
    assert prefills and prefills[0][0] == len(requests), shapes
    await _idle(engine)


async def test_a_burst_is_grouped_by_length_and_joins_the_batch_in_one_copy(
    f32_engine, monkeypatch
):
    """The head of a burst shares its padded prefill with the prompts nearest
    its length, not with the next in line; and the rows that join between
    two decode steps are stacked into the batch in one concat."""
    from llm_worker.kv_batch import KVBatch

    engine = f32_engine
    short = [_gen(f"Name a colour, number {i}.", Sampling(max_new_tokens=4)) for i in range(3)]
    long = _gen("Tell me a long story about a lighthouse. " * 12, Sampling(max_new_tokens=4))
    burst = [short[0], long, short[1], short[2]]
    lengths = [len(engine.tokenize(r).prompt) for r in burst]
    alone = [(await _run(engine, r))[1] for r in burst]
    # Room for the three short prompts in one forward, not for the long one beside any.
    monkeypatch.setattr(engine, "prefill_chunk", 3 * max(lengths[0], *lengths[2:]))
    assert 2 * lengths[1] > engine.prefill_chunk
    events: list[str] = []
    concat = KVBatch.concat

    def spy_concat(batches):
        events.append("concat")
        return concat(batches)

    monkeypatch.setattr(KVBatch, "concat", staticmethod(spy_concat))
    shapes = _forward_shapes(engine, monkeypatch)
    _spy_forwards(engine, lambda ids: events.append("step" if ids.shape[1] == 1 else "prefill"))
    _arrive_together(engine, monkeypatch, len(burst))
    together = await asyncio.gather(*(_run(engine, r) for r in burst))
    assert [ids for _, ids, _ in together] == alone
    prefills = [s for s in shapes if s[1] > 1]
    assert prefills[0] == (3, max(lengths[0], *lengths[2:])), shapes
    joins = "".join("c" if e == "concat" else "s" if e == "step" else "" for e in events)
    assert "cc" not in joins, events
    await _idle(engine)


async def test_a_burst_is_prefilled_shortest_first_whatever_its_order(f32_engine, monkeypatch):
    """The long prompt that came first in a burst is prefilled after the
    short ones that came after it (together: the chunk has room for both,
    not for the long one beside one), and every request's tokens are what
    they are alone."""
    engine = f32_engine
    long = _gen("Tell me a long story about a lighthouse. " * 12, Sampling(max_new_tokens=3))
    short = [_gen(f"Name a colour, number {i}.", Sampling(max_new_tokens=3)) for i in range(2)]
    burst = [long, *short]
    lengths = [len(engine.tokenize(r).prompt) for r in burst]
    alone = [(await _run(engine, r))[1] for r in burst]
    monkeypatch.setattr(engine, "prefill_chunk", lengths[0])
    assert 2 * max(lengths[1:]) <= engine.prefill_chunk < 2 * lengths[0]
    shapes = _forward_shapes(engine, monkeypatch)
    _arrive_together(engine, monkeypatch, len(burst))
    together = await asyncio.gather(*(_run(engine, r) for r in burst))
    assert [ids for _, ids, _ in together] == alone
    prefills = [s for s in shapes if s[1] > 1]
    assert prefills == [(2, max(lengths[1:])), (1, lengths[0])], shapes
    await _idle(engine)


async def test_an_idle_engine_waits_for_a_burst_still_being_tokenized(f32_engine, monkeypatch):
    """The long prompt is tokenized first, the short one 0.2 s later: the
    idle engine holds the first for it (the burst wait, made long here so a
    slow machine cannot outlast it; it ends when the short one arrives) and
    so prefills the short one first; without the wait the long one would
    already be running."""
    import time as clock

    from llm_worker.engines import hf

    engine = f32_engine
    long = _gen("Tell me a long story about a lighthouse. " * 12, Sampling(max_new_tokens=2))
    short = _gen("Name a colour.", Sampling(max_new_tokens=2))
    lengths = [len(engine.tokenize(r).prompt) for r in (long, short)]
    tokenize = engine.tokenize

    def slow_for_the_short_one(request):
        if request is short:
            clock.sleep(0.2)
        return tokenize(request)

    monkeypatch.setattr(engine, "tokenize", slow_for_the_short_one)
    monkeypatch.setattr(hf, "_BURST_WAIT_S", 10.0)
    monkeypatch.setattr(engine, "prefill_chunk", lengths[0])  # room for one at a time
    shapes = _forward_shapes(engine, monkeypatch)
    await asyncio.gather(_run(engine, long), _run(engine, short))
    prefills = [s for s in shapes if s[1] > 1]
    assert prefills == [(1, lengths[1]), (1, lengths[0])], shapes
    await _idle(engine)


async def test_a_long_prompt_is_prefilled_in_chunks_while_others_decode(f32_engine, monkeypatch):
    engine = f32_engine
    long = _gen("A long document about many things. " * 120, Sampling(max_new_tokens=6))
    _, alone, done = await _run(engine, long)
    assert done.prompt_tokens > 4 * 64
    monkeypatch.setattr(engine, "prefill_chunk", 64)
    shapes = _forward_shapes(engine, monkeypatch)
    decoding = asyncio.create_task(_run(engine, _gen("go on", forced="word " * 400)))
    while not shapes:  # the decoding request is in
        await asyncio.sleep(0.005)
    _, chunked, done = await _run(engine, long)
    await decoding
    assert chunked == alone
    # Its prompt went in pieces of at most 64 tokens, each followed by a decode step.
    pieces = [i for i, s in enumerate(shapes) if s == (1, 64)]
    assert len(pieces) >= done.prompt_tokens // 64 - 1, shapes
    for a, b in zip(pieces, pieces[1:], strict=False):
        assert any(s[1] == 1 for s in shapes[a + 1 : b]), shapes[a : b + 1]
    await _idle(engine)


async def test_both_decode_steps_give_the_same_tokens_in_a_padded_batch(tiny_model_dir):
    """`--decode-step auto` takes the lean loop for this Llama and
    `transformers` the model's forward; a burst of greedy requests of
    different lengths (a padded batch) decodes the same tokens on both."""
    from llm_worker.config import DECODE_STEPS, WorkerConfig
    from llm_worker.decode_step import LeanDecode, ModelDecode
    from llm_worker.engines.hf import build_hf_engine

    requests = [
        _gen(f"Say something about the number {i}. " * (1 + 2 * i), Sampling(max_new_tokens=12))
        for i in range(3)
    ]
    outputs, kinds = [], []
    for mode in DECODE_STEPS:
        config = WorkerConfig(
            model=str(tiny_model_dir), dtype="float32", prefix_cache_tokens=0, decode_step=mode
        )
        engine = await asyncio.to_thread(build_hf_engine, config)
        try:
            kinds.append(type(engine._decode))
            results = await asyncio.gather(*(_run(engine, r) for r in requests))
            outputs.append([ids for _, ids, _ in results])
        finally:
            engine.stop()
    assert kinds == [LeanDecode, ModelDecode]
    assert outputs[0] == outputs[1] and all(len(ids) == 12 for ids in outputs[0])


def test_prefill_chunk_must_not_be_negative():
    from llm_worker.config import WorkerConfig

    with pytest.raises(ValueError, match="--prefill-chunk"):
        WorkerConfig(prefill_chunk=-1)
