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
    serve_health,
)
from llm_worker.config import WorkerConfig
from llm_worker.engines import Engine, open_engine
from llm_worker.servicer import LlmWorkerServicer

log = structlog.get_logger("worker")

SERVICE_NAME = llm_worker_pb2.DESCRIPTOR.services_by_name["LlmWorkerService"].full_name

# How often the worker asks its engine whether it can serve (for a remote
# server, a GET /health): the worker's health follows the answer.
HEALTH_POLL_SECONDS = 2.0


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
    security = config.security
    server = new_server(interceptors=security.interceptors())
    servicer = LlmWorkerServicer(engine)
    llm_worker_pb2_grpc.add_LlmWorkerServiceServicer_to_server(servicer, server)
    health = add_standard_services(server, [SERVICE_NAME])
    bound = bind(server, host, port, security)
    if security.health_port:
        await serve_health(server, host, security.health_port)
    await server.start()
    await health.set(False)
    on_stop(server, lambda: servicer.engine and servicer.engine.stop())
    if engine is not None:
        if hasattr(engine, "start"):
            engine.start()
        await health.set(True)
    else:
        task = asyncio.create_task(_load_then_serve(config, servicer, health))
        if wait_ready:
            await task
        else:
            extras(server).tasks.append(task)
    extras(server).tasks.append(asyncio.create_task(_follow_health(servicer, health)))
    return server, bound


async def _load_then_serve(config: WorkerConfig, servicer: LlmWorkerServicer, health: HealthState):
    engine = await open_engine(config)
    servicer.engine = engine
    await health.set(True)
    log.info("serving", model=engine.info.model, engine=engine.info.engine)


async def _follow_health(servicer: LlmWorkerServicer, health: HealthState) -> None:
    """SERVING while the engine says it can serve; a remote server that goes
    down turns the worker NOT_SERVING, and back when it returns."""
    serving = None
    while True:
        await asyncio.sleep(HEALTH_POLL_SECONDS)
        if servicer.engine is None:
            continue
        now = await servicer.engine.healthy()
        if now != serving and serving is not None:
            log.warning("engine health changed", serving=now)
        if now != serving:
            await health.set(now)
            serving = now
