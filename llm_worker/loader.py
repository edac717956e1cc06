"""Loads a model and tokenizer onto the chosen device and dtype."""

from __future__ import annotations

import time

import structlog
import torch

from llm_worker.config import WorkerConfig
from llm_worker.decode_linear import use_decode_linears
from llm_worker.decode_step import unsupported_reason
from llm_worker.fused_linear import fuse_projections
from llm_worker.linear_probe import verdicts
from llm_worker.model_cache import resolve
from llm_worker.packed_linear import pack_linears

log = structlog.get_logger("loader")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(flag: str) -> torch.device:
    if flag == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but CUDA is not available")
    if flag == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(flag)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AMX or AVX512-BF16).
    Without it, bf16 is emulated and slower than float32."""
    try:
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    except AttributeError:  # a torch without these probes: assume not
        return False


def pick_dtype(flag: str, device: torch.device) -> torch.dtype:
    """`--dtype auto`: bfloat16 on GPUs and on CPUs with native bf16 (half the
    bytes each decode step reads, and matrix units that take it), float32 on
    other CPUs, where half precision is emulated and slow."""
    if flag != "auto":
        return _DTYPES[flag]
    if device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16()):
        return torch.bfloat16
    return torch.float32


def load(config: WorkerConfig):
    """Returns (model, tokenizer, label)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve(config.model, config.cache_dir)
    for flag, value in (
        ("--threads", config.threads),
        ("--prefill-threads", config.prefill_threads),
    ):
        if value < 0:
            raise ValueError(f"{flag} must be 0 (the default) or more, not {value}")
    if config.threads:
        # Process-wide: the engine thread's kernels use this intra-op pool.
        torch.set_num_threads(config.threads)
    device = pick_device("auto" if config.device_map else config.device)
    dtype = pick_dtype(config.dtype, device)
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    if config.device_map:
        # accelerate spreads the layers over the GPUs (and CPU) that fit them.
        model = AutoModelForCausalLM.from_pretrained(
            source.path, dtype=dtype, device_map=config.device_map
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype).to(device)
        if config.decode_step != "transformers" and not unsupported_reason(model):
            fuse_projections(model)  # the lean decode step's layout, before packing
        # Before packing, which leaves the kernel's linears alone (one copy each).
        use_decode_linears(model, config.decode_linear, config.cache_dir)
        # CPU only; float32 is measured once on this machine (linear_probe.py).
        with verdicts(config.cache_dir) as probe:
            pack_linears(model, config.pack_linears, probe)
    log.info(
        "model loaded",
        model=source.label,
        device=str(getattr(model, "hf_device_map", None) or device),
        dtype=str(dtype).removeprefix("torch."),
        cpu_threads=torch.get_num_threads(),
        seconds=round(time.perf_counter() - start, 2),
    )
    return model, tokenizer, source.label
