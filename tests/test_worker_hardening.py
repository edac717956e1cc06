"""The worker against bad input and failures: sampling values are checked at
the edge, a request whose decoding fails ends alone while its neighbours
decode on, a long prompt is tokenized without stalling the event loop, a
request over the size cap is refused before tokenizing, and tool results too
long for the context are cut to fit."""

from __future__ import annotations

import asyncio
import contextlib
import time

import grpc
import pytest
from conveyor.v1 import common_pb2, llm_worker_pb2, llm_worker_pb2_grpc

import llm_worker.engines.hf as engine_module
from conveyor_common.convert import BadRequest, sampling_from_pb
from conveyor_common.server import stop_server
from conveyor_common.types import FinishReason, Message, Sampling
from llm_worker.engines import Delta, GenerationRequest
from llm_worker.engines.hf import HfEngine
from llm_worker.prompt import fitted_prompt_ids, prompt_ids
from llm_worker.servicer import MAX_REQUEST_BYTES
from tests.test_engine_batching import _idle

SMALL_CONTEXT = 1024
CUT = "characters cut to fit the model's context"
ENDED_WELL = (FinishReason.STOP, FinishReason.LENGTH)


@pytest.fixture(scope="module")
async def small(tiny_model_dir):
    """(engine, target): the tiny model with a 1024-token context, on its own
    engine (tests here patch its model) and server."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_worker.config import WorkerConfig
    from llm_worker.server import create_server

    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, max_position_embeddings=SMALL_CONTEXT
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    engine = HfEngine(model, tokenizer, default_max_new_tokens=16)
    await asyncio.to_thread(engine.warm_up)
    server, port = await create_server(WorkerConfig(model=str(tiny_model_dir)), engine=engine)
    yield engine, f"127.0.0.1:{port}"
    await stop_server(server, 0)


@pytest.fixture
async def stub(small):
    _, target = small
    async with grpc.aio.insecure_channel(target) as channel:
        yield llm_worker_pb2_grpc.LlmWorkerServiceStub(channel)


def _gen(text: str, sampling: Sampling | None = None, forced: str | None = None):
    return GenerationRequest(
        messages=[Message("user", text)], sampling=sampling or Sampling(), forced_completion=forced
    )


async def _run(engine, request: GenerationRequest, seconds: float = 30.0):
    """(text, ids, completion); fails rather than hangs past `seconds`."""

    async def run():
        text, ids, done = "", [], None
        async for item in engine.generate(request):
            if isinstance(item, Delta):
                text, ids = text + item.text, ids + item.token_ids
            else:
                done = item
        return text, ids, done

    return await asyncio.wait_for(run(), seconds)


async def _first_delta_then_rest(engine, request: GenerationRequest, started: asyncio.Event):
    """Like _run, setting `started` once the request decodes (it is in the batch)."""
    text, ids, done = "", [], None
    async for item in engine.generate(request):
        if isinstance(item, Delta):
            text, ids = text + item.text, ids + item.token_ids
            started.set()
        else:
            done = item
    started.set()
    return text, ids, done


@contextlib.contextmanager
def patched_forward(engine, before_step):
    """Calls `before_step(input_ids)` ahead of every decode step (one token a
    row) of `engine`; prefills pass untouched."""
    step = engine._decode

    def spy(tokens, *rest):
        before_step(tokens)
        return step(tokens, *rest)

    engine._decode = spy
    try:
        yield
    finally:
        engine._decode = step


def _slow_steps(input_ids) -> None:
    time.sleep(0.003)  # keeps a request in the batch long enough for a second to join


# ---- sampling values (issue 11, item 5) -------------------------------------


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": 101.0}, "temperature"),
        ({"top_p": float("nan")}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 1 << 30}, "top_k"),
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"max_new_tokens": 1 << 30}, "max_new_tokens"),
        ({"stop": ["x"] * 17}, "stop"),
        ({"stop": ["ok", ""]}, "stop[1]"),
        ({"stop": ["x" * 257]}, "stop[0]"),
    ],
)
def test_sampling_values_are_checked_naming_the_field(fields, named):
    with pytest.raises(BadRequest, match=named.replace("[", r"\[")):
        sampling_from_pb(common_pb2.SamplingParams(**fields))


def test_sampling_values_at_their_bounds_pass():
    s = sampling_from_pb(
        common_pb2.SamplingParams(temperature=100, top_p=0, top_k=1 << 20, stop=["x" * 256] * 16)
    )
    assert s.temperature == 100 and s.top_p == 1.0  # 0 means off
    assert sampling_from_pb(common_pb2.SamplingParams()).temperature == 0


@pytest.mark.parametrize("temperature", [float("nan"), float("inf")])
async def test_a_nan_or_inf_temperature_is_invalid_argument(stub, temperature):
    request = llm_worker_pb2.GenerateRequest(
        messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="Hi")],
        sampling=common_pb2.SamplingParams(temperature=temperature, max_new_tokens=4),
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in stub.Generate(request, timeout=10):
            pass
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "temperature" in err.value.details()


# ---- a failure ends only its own request (item 5) ---------------------------


async def test_a_nan_request_ends_alone_and_its_neighbour_decodes_on(small):
    """A NaN temperature that got past the edge fails its first token choice:
    it ends ERROR at once, and a greedy request in the batch beside it gets
    exactly the text it gets alone."""
    engine, _ = small
    greedy = _gen("Tell me a story.", Sampling(max_new_tokens=40))
    alone_text, alone_ids, _ = await _run(engine, greedy)
    with patched_forward(engine, _slow_steps):
        started = asyncio.Event()
        neighbour = asyncio.create_task(_first_delta_then_rest(engine, greedy, started))
        await asyncio.wait_for(started.wait(), 30)
        _, _, bad = await _run(engine, _gen("Hi", Sampling(temperature=float("nan"), seed=1)), 10)
        text, ids, done = await asyncio.wait_for(neighbour, 30)
    assert bad.finish_reason is FinishReason.ERROR and "nan" in bad.message
    assert done.finish_reason in ENDED_WELL, done.message
    assert (text, ids) == (alone_text, alone_ids)
    await _idle(engine)


async def test_a_row_whose_sampling_fails_mid_decode_ends_alone(small, monkeypatch):
    engine, _ = small
    greedy = _gen("Count to ten.", Sampling(max_new_tokens=40))
    alone_text, alone_ids, _ = await _run(engine, greedy)
    calls = 0

    def failing_next_token(logits, params, generator):
        nonlocal calls
        calls += 1
        if calls == 5:
            raise RuntimeError("sampler exploded")
        return real_next_token(logits, params, generator)

    real_next_token = engine_module.next_token
    monkeypatch.setattr(engine_module, "next_token", failing_next_token)
    sampled = _gen("Hi", Sampling(temperature=1.0, seed=13, max_new_tokens=40))
    with patched_forward(engine, _slow_steps):
        started = asyncio.Event()
        neighbour = asyncio.create_task(_first_delta_then_rest(engine, greedy, started))
        await asyncio.wait_for(started.wait(), 30)
        _, _, bad = await _run(engine, sampled)
        text, ids, done = await asyncio.wait_for(neighbour, 30)
    assert bad.finish_reason is FinishReason.ERROR and "sampler exploded" in bad.message
    assert bad.completion_tokens == 4  # the fifth choice failed
    assert done.finish_reason in ENDED_WELL, done.message
    assert (text, ids) == (alone_text, alone_ids)
    await _idle(engine)


async def test_a_failing_forward_pass_ends_only_the_row_that_fails_it(small):
    """A decode step that fails for the whole batch is retried row by row:
    the row that fails alone too ends ERROR, the other decodes on with the
    text it gets alone, and the engine ends idle."""
    engine, _ = small
    greedy = _gen("Describe the sea.", Sampling(max_new_tokens=40))
    alone_text, alone_ids, _ = await _run(engine, greedy)
    forced = " one two three zebra four five six seven"
    (poison,) = engine.tokenizer.encode(" zebra", add_special_tokens=False)
    assert poison not in alone_ids
    failed_batches = []

    def before_step(input_ids) -> None:
        _slow_steps(input_ids)
        if poison in input_ids.flatten().tolist():
            failed_batches.append(input_ids.shape[0])
            raise RuntimeError("poisoned step")

    with patched_forward(engine, before_step):
        started = asyncio.Event()
        neighbour = asyncio.create_task(_first_delta_then_rest(engine, greedy, started))
        await asyncio.wait_for(started.wait(), 30)
        bad_text, _, bad = await _run(engine, _gen("Hi", forced=forced))
        text, ids, done = await asyncio.wait_for(neighbour, 30)
    assert failed_batches[0] == 2, failed_batches  # the batch, then the row alone
    assert bad.finish_reason is FinishReason.ERROR and "poisoned step" in bad.message
    assert forced.startswith(bad_text) and "zebra" in bad_text
    assert done.finish_reason in ENDED_WELL, done.message
    assert (text, ids) == (alone_text, alone_ids)
    await _idle(engine)


async def test_a_tiny_temperature_samples_like_greedy(small):
    """Dividing by 1e-40 overflowed every logit to inf (NaN probabilities)."""
    engine, _ = small
    _, greedy_ids, _ = await _run(engine, _gen("Name a colour.", Sampling(max_new_tokens=12)))
    sampling = Sampling(temperature=1e-40, seed=3, max_new_tokens=12)
    _, ids, done = await _run(engine, _gen("Name a colour.", sampling))
    assert done.finish_reason in ENDED_WELL, done.message
    assert ids == greedy_ids


# ---- long prompts and the size cap (item 6) ---------------------------------


def _user(text: str) -> llm_worker_pb2.GenerateRequest:
    return llm_worker_pb2.GenerateRequest(
        messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=text)],
        sampling=common_pb2.SamplingParams(max_new_tokens=8),
    )


async def _status(stub, request, seconds: float = 60.0) -> tuple[grpc.StatusCode, str, int]:
    """(code, details, events seen before the end)."""
    events = 0
    try:
        async for _ in stub.Generate(request, timeout=seconds):
            events += 1
    except grpc.aio.AioRpcError as e:
        return e.code(), e.details(), events
    return grpc.StatusCode.OK, "", events


async def test_a_long_prompt_is_tokenized_without_stalling_the_event_loop(small, stub):
    """A 2 MiB prompt (under the size cap, over the context) takes seconds to
    tokenize: meanwhile the event loop keeps its pace and a small request
    runs to its end; then the long one is INVALID_ARGUMENT."""
    engine, _ = small
    huge = ("lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 40000)[: 2 << 20]
    finished: list[str] = []
    lag = 0.0
    done = False

    async def ticker() -> None:
        nonlocal lag
        while not done:
            start = time.perf_counter()
            await asyncio.sleep(0.01)
            lag = max(lag, time.perf_counter() - start - 0.01)

    async def long_one():
        result = await _status(stub, _user(huge))
        finished.append("long")
        return result

    ticking = asyncio.create_task(ticker())
    long_task = asyncio.create_task(long_one())
    for _ in range(500):  # until the long one is being tokenized
        if engine.running:
            break
        await asyncio.sleep(0.01)
    small_code, _, small_events = await _status(stub, _user("Hi"))
    finished.append("small")
    code, details, events = await long_task
    done = True
    await ticking
    assert small_code == grpc.StatusCode.OK and small_events > 0
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "context" in details, details
    assert events == 0
    assert finished == ["small", "long"]
    assert lag < 0.5, f"the event loop stalled for {lag:.2f} s"


async def test_a_request_over_the_size_cap_is_refused_before_tokenizing(small, stub, monkeypatch):
    engine, _ = small
    tokenized = []
    monkeypatch.setattr(engine, "tokenize", tokenized.append, raising=False)
    code, details, events = await _status(stub, _user("x" * (12 << 20)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert f"at most {MAX_REQUEST_BYTES}" in details and events == 0
    assert tokenized == []


async def test_model_info_reports_the_context(stub):
    info = await stub.GetModelInfo(llm_worker_pb2.GetModelInfoRequest(), timeout=10)
    assert info.max_context_tokens == SMALL_CONTEXT and info.device == "cpu"


# ---- tool results over the context (item 9) ---------------------------------


def _conversation(tool_output: str) -> list[Message]:
    return [
        Message("system", "You run Python for the user."),
        Message("user", "Print a long line."),
        Message("assistant", "```python\nprint('ab ' * 40000)\n```"),
        Message("tool", tool_output, name="python", tool_call_id="call-1"),
    ]


async def test_a_tool_result_over_the_context_is_cut_to_fit(small, stub):
    engine, _ = small
    output = "START " + "ab " * 40000 + " END"  # 120 KB, some 22000 tokens
    messages = _conversation(output)
    pb = llm_worker_pb2.GenerateRequest(
        messages=[
            common_pb2.ChatMessage(role=common_pb2.ROLE_SYSTEM, content=messages[0].content),
            common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=messages[1].content),
            common_pb2.ChatMessage(role=common_pb2.ROLE_ASSISTANT, content=messages[2].content),
            common_pb2.ChatMessage(role=common_pb2.ROLE_TOOL, content=output, name="python"),
        ],
        sampling=common_pb2.SamplingParams(max_new_tokens=8),
    )
    completes = []
    async for response in stub.Generate(pb, timeout=60):
        assert response.WhichOneof("event") != "error", response.error.message
        if response.WhichOneof("event") == "complete":
            completes.append(response.complete)
    assert len(completes) == 1 and completes[0].prompt_tokens <= SMALL_CONTEXT - 8

    request = GenerationRequest(messages=messages, sampling=Sampling(max_new_tokens=8))
    prompt = engine.tokenize(request).prompt
    assert len(prompt) == completes[0].prompt_tokens
    assert engine.tokenize(request).prompt == prompt  # the same request, the same ids
    text = engine.tokenizer.decode(prompt)
    assert CUT in text and "START ab ab" in text and "ab ab  END" in text
    # The earlier round's prompt is still a prefix (for the prefix cache).
    earlier = prompt_ids(engine.tokenizer, messages[:2], [])
    assert prompt[: len(earlier)] == earlier


def test_the_largest_tool_result_is_cut_first(small):
    engine, _ = small
    big, little = "big " * 15000, "little result"
    messages = [
        Message("user", "Run two tools."),
        Message("tool", little, name="a"),
        Message("tool", big, name="b"),
    ]
    ids = fitted_prompt_ids(engine.tokenizer, messages, [], budget=600)
    assert len(ids) <= 600
    text = engine.tokenizer.decode(ids)
    assert little in text and text.count(CUT) == 1 and "big big" in text
    assert prompt_ids(engine.tokenizer, messages[:2], []) == fitted_prompt_ids(
        engine.tokenizer, messages[:2], [], budget=600
    )  # what fits is left alone


async def test_a_user_message_over_the_context_is_invalid_argument(stub):
    too_long = " hello" * (SMALL_CONTEXT + 10)  # a token a word at least
    code, details, events = await _status(stub, _user(too_long))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and events == 0
    assert "context is 1024" in details, details
    # A tool result beside it is cut, and that is said, but the user's text is not.
    request = _user(too_long)
    request.messages.append(common_pb2.ChatMessage(role=common_pb2.ROLE_TOOL, content="x" * 9000))
    code, details, events = await _status(stub, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and events == 0
    assert "tool results cut" in details, details
