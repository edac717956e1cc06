"""llama.cpp as a peer row of the worker benchmark, run in .venv-llamacpp
(llama-cpp-python, `make install-llamacpp`) on the default model's own GGUF.

    .venv-llamacpp/bin/python -m bench.worker.llamacpp_peer < job.json > result.json

The job gives the prompts and the forced completions as token ids; each
stream is timed as the worker's streams are: the prompt's prefill gives the
first token, then every forced token is fed as one real decode step, which
yields the next. One stream at a time: llama-cpp-python's `Llama` holds one
sequence. Also reports how often the quantized model's own top-1 token is
the forced (float32 greedy) one. Only the standard library, numpy and
llama_cpp here: this runs outside the project's venv.
"""

from __future__ import annotations

import json
import sys
import time


def run(job: dict) -> dict:
    import llama_cpp
    import llama_cpp.llama_cpp as low
    import numpy as np

    # On CPUs with AMX the weight-repack buffers crashed in llama_decode; the
    # high-level Llama takes no flag for them, so its default params get one.
    defaults = low.llama_model_default_params

    def without_extra_bufts():
        params = defaults()
        if hasattr(params, "use_extra_bufts"):
            params.use_extra_bufts = False
        return params

    low.llama_model_default_params = without_extra_bufts

    kwargs = dict(
        model_path=job["gguf"],
        n_ctx=job.get("n_ctx", 4096),
        n_batch=512,
        n_threads=job["threads"],
        n_threads_batch=job["threads"],
        verbose=False,
    )
    llm = llama_cpp.Llama(**kwargs)
    vocab = llm.n_vocab()

    def top1() -> int:  # the last evaluated position's greedy token
        return int(np.argmax(np.ctypeslib.as_array(low.llama_get_logits(llm.ctx), (vocab,))))

    llm.eval(job["prompts"][0][:64])  # warm: the first eval pays lazy init
    llm.eval(job["forced"][0][:1])
    streams = []
    for prompt, forced in zip(job["prompts"], job["forced"], strict=True):
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        agree = int(top1() == forced[0])
        first = time.perf_counter()
        for i, token in enumerate(forced[:-1]):
            llm.eval([token])  # one decode step: gives forced[i + 1]'s logits
            agree += int(top1() == forced[i + 1])
        last = time.perf_counter()
        streams.append(
            {
                "tokens": len(forced),
                "ttft_s": first - start,
                "decode_s": last - first,
                "total_s": last - start,
                "top1_agreement": agree / len(forced),
            }
        )
    return {"version": llama_cpp.__version__, "streams": streams}


if __name__ == "__main__":
    json.dump(run(json.load(sys.stdin)), sys.stdout)
