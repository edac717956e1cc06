"""Shared fixtures: a tiny random model with the default tokenizer, and the
three services in-process on port 0."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conveyor_common.server import stop_server


def descendant_pids(root: int | None = None) -> set[int]:
    """Every live process below `root` (default: this test process)."""
    root = root or os.getpid()
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # The command may hold spaces or parentheses: split after the last ')'.
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] == "Z":  # a zombie is already dead
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    found: set[int] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The default model's cached conversion (made on first use)."""
    from llm_worker.model_cache import resolve

    return Path(resolve("").path)


def save_tiny_model(
    tokenizer, path: Path, context: int = 8192, eos_ids=None, head_size: int = 16
) -> Path:
    """Saves a 2-layer random Llama over `tokenizer`'s vocabulary, and the
    tokenizer, at `path`; `eos_ids` (default: the tokenizer's EOS) end a
    sequence. Two query heads per KV head of `head_size` each (vLLM's CPU
    attention needs 32 or more)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = 4 if head_size == 16 else 2
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=heads * head_size,
        intermediate_size=2 * heads * head_size,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        max_position_embeddings=context,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    if eos_ids is not None:
        model.generation_config.eos_token_id = list(eos_ids)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, default_model_dir) -> Path:
    """A 2-layer random Llama that shares the default model's tokenizer and
    chat template, so prompts and forced completions tokenize as in production."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    return save_tiny_model(tokenizer, tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
async def worker(tiny_model_dir):
    """(engine, target) of an in-process worker on the tiny model."""
    from llm_worker.config import WorkerConfig
    from llm_worker.engines.hf import build_hf_engine
    from llm_worker.server import create_server

    config = WorkerConfig(model=str(tiny_model_dir), max_new_tokens=64)
    engine = build_hf_engine(config)
    server, port = await create_server(config, engine=engine)
    yield engine, f"127.0.0.1:{port}"
    await stop_server(server, 0)


@pytest.fixture(scope="session")
async def gateway():
    from tool_gateway.config import GatewayConfig
    from tool_gateway.server import create_server

    tools_file = str(Path(__file__).with_name("tools.yaml"))
    config = GatewayConfig(unit_timeout=20.0, tools_file=tools_file)
    server, port = await create_server(config, "127.0.0.1", 0)
    yield f"127.0.0.1:{port}"
    await stop_server(server, 0)


@pytest.fixture(scope="session")
async def scheduler(worker, gateway):
    from scheduler.config import SchedulerConfig
    from scheduler.server import create_server

    _, worker_target = worker
    server, port = await create_server(
        SchedulerConfig(worker_target=worker_target, gateway_target=gateway)
    )
    yield f"127.0.0.1:{port}"
    await stop_server(server, 0)


@pytest.fixture
async def stub(scheduler):
    """A ConveyorService stub of the in-process stack. (Tests of one service
    alone define a `stub` fixture of their own, which takes precedence.)"""
    import grpc
    from conveyor.v1 import conveyor_pb2_grpc

    async with grpc.aio.insecure_channel(scheduler) as channel:
        yield conveyor_pb2_grpc.ConveyorServiceStub(channel)
