"""The engines a worker fronts, behind one interface (base.Engine):

- hf     (hf.py): transformers in this process, continuous batching; the default.
- vllm   (vllm_engine.py): vLLM's AsyncLLM in this process.
- openai (openai_remote.py): a remote OpenAI-compatible server.

`open_engine` builds the one the config names; nothing else imports an
engine module, so vLLM and httpx load only where they are used."""

from __future__ import annotations

import asyncio

from llm_worker.config import WorkerConfig
from llm_worker.engines.base import (
    Completion,
    Delta,
    Engine,
    EngineInfo,
    EngineUnavailable,
    GenerationRequest,
    RequestError,
)

__all__ = [
    "Completion",
    "Delta",
    "Engine",
    "EngineInfo",
    "EngineUnavailable",
    "GenerationRequest",
    "RequestError",
    "open_engine",
]


async def open_engine(config: WorkerConfig) -> Engine:
    """Loads and starts the configured engine; returns once it can serve."""
    if config.engine == "vllm":
        from llm_worker.engines.vllm_engine import VllmEngine

        return await VllmEngine.open(config)
    if config.engine == "openai":
        from llm_worker.engines.openai_remote import OpenAIEngine

        return await OpenAIEngine.open(config)
    from llm_worker.engines.hf import build_hf_engine

    return await asyncio.to_thread(build_hf_engine, config)
