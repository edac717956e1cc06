"""llm_worker on the tiny model: streaming, forced decoding, detokenization,
sampling, cancel and abort, through the gRPC API."""

from __future__ import annotations

import asyncio
import os

import grpc
import pytest
import torch
from conveyor.v1 import common_pb2, llm_worker_pb2, llm_worker_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llm_worker.detokenizer import IncrementalDetokenizer

TRICKY = "héllo wörld 🚀 naïve — 日本語のテキスト ```python\nprint('ok')\n```\n\t tabs  and  spaces"


def _request(**kw) -> llm_worker_pb2.GenerateRequest:
    return llm_worker_pb2.GenerateRequest(
        messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="Say something.")],
        **kw,
    )


async def _collect(stub, request):
    text, ids, complete = "", [], None
    async for response in stub.Generate(request, timeout=60):
        kind = response.WhichOneof("event")
        if kind == "delta":
            text += response.delta.text
            ids.extend(response.delta.token_ids)
        elif kind == "complete":
            complete = response.complete
        else:
            pytest.fail(f"unexpected error: {response.error.message}")
    return text, ids, complete


@pytest.fixture
async def stub(worker):
    _, target = worker
    async with grpc.aio.insecure_channel(target) as channel:
        yield llm_worker_pb2_grpc.LlmWorkerServiceStub(channel)


def test_detokenizer_never_splits_a_character(default_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    ids = tokenizer.encode(TRICKY, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.push(i)[0] for i in ids]
    pieces.append(detok.flush()[0])
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == TRICKY
    # Multi-byte characters really were split across tokens, or the test proves nothing.
    assert len(ids) > len([p for p in pieces if p])


async def test_forced_decoding_streams_exactly_the_completion(stub):
    text, ids, complete = await _collect(
        stub, _request(forced_decoding=common_pb2.ForcedDecoding(completion=TRICKY))
    )
    assert text == TRICKY
    assert complete.finish_reason == common_pb2.FINISH_REASON_FORCED_END
    assert complete.completion_tokens == len(ids) > 0
    assert complete.prompt_tokens > 0


async def test_seeded_sampling_is_reproducible(stub):
    sampling = common_pb2.SamplingParams(temperature=1.0, top_k=50, seed=7, max_new_tokens=24)
    first = await _collect(stub, _request(sampling=sampling))
    second = await _collect(stub, _request(sampling=sampling))
    assert first[1] == second[1] and len(first[1]) > 0
    other = await _collect(
        stub,
        _request(sampling=common_pb2.SamplingParams(temperature=1.0, seed=8, max_new_tokens=24)),
    )
    assert other[1] != first[1]


async def test_max_new_tokens_and_stop_strings(stub):
    _, ids, complete = await _collect(
        stub, _request(sampling=common_pb2.SamplingParams(max_new_tokens=5))
    )
    assert complete.finish_reason in (
        common_pb2.FINISH_REASON_LENGTH,
        common_pb2.FINISH_REASON_STOP,
    )
    assert len(ids) <= 5
    text, _, complete = await _collect(
        stub,
        _request(
            forced_decoding=common_pb2.ForcedDecoding(completion="one two three four five"),
            sampling=common_pb2.SamplingParams(stop=["three"]),
        ),
    )
    assert complete.finish_reason == common_pb2.FINISH_REASON_STOP_STRING
    assert text.endswith("three") and "four" not in text


async def _wait_idle(engine, seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.05)):
        if engine.running == 0:
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"{engine.running} requests still running")


async def test_cancelling_the_stream_stops_generation(worker, stub):
    engine, _ = worker
    long_text = "word " * 3000
    call = stub.Generate(_request(forced_decoding=common_pb2.ForcedDecoding(completion=long_text)))
    seen = 0
    async for _response in call:
        seen += 1
        if seen == 5:
            break
    call.cancel()
    await _wait_idle(engine)


async def test_abort_rpc_ends_the_stream_with_aborted(worker, stub):
    engine, _ = worker
    request = _request(
        request_id="to-abort",
        forced_decoding=common_pb2.ForcedDecoding(completion="word " * 3000),
    )
    reasons, deltas = [], 0
    async for response in stub.Generate(request, timeout=60):
        if response.WhichOneof("event") == "delta":
            deltas += 1
            if deltas == 3:
                found = await stub.Abort(llm_worker_pb2.AbortRequest(request_id="to-abort"))
                assert found.found
        elif response.WhichOneof("event") == "complete":
            reasons.append(response.complete.finish_reason)
            assert response.complete.completion_tokens < 3000
    assert reasons == [common_pb2.FINISH_REASON_ABORTED]
    await _wait_idle(engine)
    missing = await stub.Abort(llm_worker_pb2.AbortRequest(request_id="to-abort"))
    assert not missing.found


async def test_bad_requests_get_invalid_argument(stub):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _collect(stub, llm_worker_pb2.GenerateRequest())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _collect(stub, _request(sampling=common_pb2.SamplingParams(temperature=-1)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    bad_role = llm_worker_pb2.GenerateRequest(messages=[common_pb2.ChatMessage(content="x")])
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _collect(stub, bad_role)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_health_is_not_serving_until_the_model_is_loaded(tiny_model_dir):
    from conveyor_common.server import stop_server
    from llm_worker.config import WorkerConfig
    from llm_worker.server import create_server

    server, port = await create_server(WorkerConfig(model=str(tiny_model_dir)), wait_ready=False)
    statuses = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for _ in range(400):
            response = await health.Check(health_pb2.HealthCheckRequest())
            statuses.append(response.status)
            if response.status == health_pb2.HealthCheckResponse.SERVING:
                break
            await asyncio.sleep(0.05)
        info = await llm_worker_pb2_grpc.LlmWorkerServiceStub(channel).GetModelInfo(
            llm_worker_pb2.GetModelInfoRequest()
        )
    await stop_server(server, 0)
    assert statuses[0] == health_pb2.HealthCheckResponse.NOT_SERVING
    assert statuses[-1] == health_pb2.HealthCheckResponse.SERVING
    from llm_worker.loader import pick_dtype

    auto = str(pick_dtype("auto", torch.device("cpu"))).removeprefix("torch.")
    assert info.device == "cpu" and info.dtype == auto


@pytest.mark.parametrize("native_bf16, expected", [(True, "bfloat16"), (False, "float32")])
def test_dtype_auto_is_bf16_only_where_the_cpu_has_it(monkeypatch, native_bf16, expected):
    from llm_worker import loader

    monkeypatch.setattr(loader, "cpu_has_native_bf16", lambda: native_bf16)
    assert str(loader.pick_dtype("auto", torch.device("cpu"))) == f"torch.{expected}"
    assert loader.pick_dtype("float32", torch.device("cpu")) == torch.float32
    # A GPU takes bf16 whatever the host CPU has.
    assert loader.pick_dtype("auto", torch.device("cuda")) == torch.bfloat16


def test_threads_flag_sets_torchs_cpu_threads(tiny_model_dir):
    import torch

    from llm_worker.config import WorkerConfig, build_parser
    from llm_worker.loader import load

    config = WorkerConfig.from_args(
        build_parser().parse_args(["--model", str(tiny_model_dir), "--threads", "1"])
    )
    before = torch.get_num_threads()
    try:
        load(config)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="--threads"):
        load(WorkerConfig(model=str(tiny_model_dir), threads=-1))
    with pytest.raises(ValueError, match="--prefill-threads"):
        load(WorkerConfig(model=str(tiny_model_dir), prefill_threads=-1))


def test_the_local_stack_leaves_the_tools_a_core():
    from conveyor_common import stack

    worker = next(s for s in stack.SERVICES if s.name == "llm_worker")

    def flag(name: str) -> int:
        return int(worker.args[worker.args.index(name) + 1])

    cores = len(os.sched_getaffinity(0))
    assert flag("--threads") >= 1 and (flag("--threads") < cores or cores == 1)
    assert flag("--prefill-threads") == cores
