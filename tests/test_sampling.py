"""Greedy choice: the engine's one-pass `greedy` picks what argmax picks."""

from __future__ import annotations

import pytest
import torch

from llm_worker.sampling import greedy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_is_argmax_first_of_equals_included(dtype):
    torch.manual_seed(3)
    logits = torch.randn(16, 4099).to(dtype)
    logits[0, 7] = logits[0, 9] = logits[0, 4000] = 50.0  # a tie: the first wins
    logits[1, -1] = 50.0  # the last column
    logits[2] = -3.0  # every column equal
    assert torch.equal(greedy(logits), logits.argmax(dim=-1))
    assert greedy(logits)[:3].tolist() == [7, 4098, 0]
    assert int(greedy(logits[5])) == int(logits[5].argmax())
