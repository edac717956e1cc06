"""Builds the worker's gRPC server (the seam tests call)."""

from __future__ import annotations

import asyncio

import grpc
import structlog
from conveyor.v1 import llm_worker_pb2, llm_worker_pb2_grpc

from conveyor_common.server import (
    HealthState,
    add_standard_services,
    bind,
    extras,
    new_server,
    on_stop,
)
from llm_worker.config import WorkerConfig
from llm_worker.engine import Engine
from llm_worker.loader import load
from llm_worker.servicer import LlmWorkerServicer
from llm_worker.tool_format import choose_tool_format

log = structlog.get_logger("worker")

SERVICE_NAME = llm_worker_pb2.DESCRIPTOR.services_by_name["LlmWorkerService"].full_name


def build_engine(config: WorkerConfig) -> tuple[Engine, str]:
    """Loads the model, warms it up and starts the engine thread (blocking)."""
    model, tokenizer, label = load(config)
    engine = Engine(
        model,
        tokenizer,
        default_max_new_tokens=config.max_new_tokens,
        max_queue=config.max_queue,
        max_batch=config.max_batch,
        prefix_cache_tokens=config.prefix_cache_tokens,
        prefill_threads=config.prefill_threads,
        tool_call_format=choose_tool_format(tokenizer, config.tool_call_format, label),
    )
    engine.warm_up()
    engine.start()
    return engine, label


async def create_server(
    config: WorkerConfig,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    engine: Engine | None = None,
    wait_ready: bool = True,
) -> tuple[grpc.aio.Server, int]:
    """Starts the server. Health is NOT_SERVING until the model is loaded and
    warm; with wait_ready=False loading goes on in the background (what the
    CLI does, so orchestrators can watch health during a long load)."""
    server = new_server()
    servicer = LlmWorkerServicer(config.model or "default", engine)
    llm_worker_pb2_grpc.add_LlmWorkerServiceServicer_to_server(servicer, server)
    health = add_standard_services(server, [SERVICE_NAME])
    bound = bind(server, host, port)
    await server.start()
    await health.set(False)
    on_stop(server, lambda: servicer.engine and servicer.engine.stop())
    if engine is not None:
        engine.start()
        await health.set(True)
    else:
        task = asyncio.create_task(_load_then_serve(config, servicer, health))
        if wait_ready:
            await task
        else:
            extras(server).tasks.append(task)
    return server, bound


async def _load_then_serve(config: WorkerConfig, servicer: LlmWorkerServicer, health: HealthState):
    engine, label = await asyncio.to_thread(build_engine, config)
    servicer.model_label = label
    servicer.engine = engine
    await health.set(True)
    log.info("serving", model=label)
