"""Builds a randomly initialised copy of a model: its config and tokenizer,
new weights. For measuring decode speed where the real weights are not at
hand (a GPU machine that cannot download them): a forward pass costs the same
whatever the weights hold, and forced decoding fixes the tokens.

    python -m bench.worker.random_model SOURCE OUT

SOURCE is a folder (or model id) with config.json and the tokenizer files.
"""

from __future__ import annotations

import sys


def build(source: str, out: str) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(source)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    build(sys.argv[1], sys.argv[2])
