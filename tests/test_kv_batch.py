"""The batch cache's GrowingLayer: decode steps append in place (no copy of
the history per step), the logits are those of transformers' own
DynamicCache, and copies handed to the prefix cache share no memory with the
running batch."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from llm_worker.kv_batch import GrowingLayer, KVBatch


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def _prefill(model, prompt: list[int]):
    with torch.inference_mode():
        return model(input_ids=torch.tensor([prompt]), use_cache=True)


def layer_kv(layer) -> tuple[torch.Tensor, torch.Tensor]:
    return layer.keys, layer.values


def test_steps_append_in_place_and_match_dynamic_cache(model):
    prompt = [5, 17, 300, 42, 9, 11, 800]
    feed = list(range(100, 200))  # 100 steps: past the first buffer's spare capacity
    plain = _prefill(model, prompt).past_key_values
    kv = KVBatch.single(_prefill(model, prompt).past_key_values)
    assert all(isinstance(layer, GrowingLayer) for layer in kv.cache.layers)
    layer = kv.cache.layers[0]
    buffers = set()
    with torch.inference_mode():
        for t in feed:
            token = torch.tensor([[t]])
            want = model(input_ids=token, past_key_values=plain, use_cache=True).logits[0, -1]
            got = model(input_ids=token, past_key_values=kv.cache, use_cache=True).logits[0, -1]
            kv.grew()
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            buffers.add(layer._key_buf.data_ptr())
    assert kv.cache.get_seq_length() == len(prompt) + len(feed)
    # 107 columns: the adopted prefill, one buffer of 8 + 64, then one of 73 + 64.
    assert len(buffers) == 2
    assert kv.nbytes() >= sum(t.nbytes for layer in kv.cache.layers for t in layer_kv(layer))


def test_prefix_copies_share_no_memory_with_the_batch(model):
    kv = KVBatch.single(_prefill(model, [1, 2, 3, 4, 5]).past_key_values)
    with torch.inference_mode():
        model(input_ids=torch.tensor([[6]]), past_key_values=kv.cache, use_cache=True)
    kv.grew()
    saved = kv.row_prefix(0, 6)
    before = saved.cache.layers[0].keys.clone()
    with torch.inference_mode():  # the batch writes its next column into its own buffer
        model(input_ids=torch.tensor([[7]]), past_key_values=kv.cache, use_cache=True)
    kv.grew()
    batch_buf = kv.cache.layers[0]._key_buf
    for layer in saved.cache.layers:
        assert layer.keys.untyped_storage().data_ptr() != batch_buf.untyped_storage().data_ptr()
    torch.testing.assert_close(saved.cache.layers[0].keys, before)
    assert saved.nbytes() == sum(t.nbytes for layer in saved.cache.layers for t in layer_kv(layer))


def test_a_replaced_history_starts_a_new_buffer(model):
    """transformers' own cache methods (here crop) replace `keys`; the next
    update must build on the replaced tensors, not on the stale buffer."""
    prompt = [9, 8, 7, 6, 5, 4]
    kv = KVBatch.single(_prefill(model, prompt).past_key_values)
    plain = _prefill(model, prompt[:4]).past_key_values
    with torch.inference_mode():
        model(input_ids=torch.tensor([[3]]), past_key_values=kv.cache, use_cache=True)
        kv.cache.crop(-3)  # back to the first 4 prompt tokens
        got = model(input_ids=torch.tensor([[42]]), past_key_values=kv.cache, use_cache=True)
        want = model(input_ids=torch.tensor([[42]]), past_key_values=plain, use_cache=True)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-5)
    assert kv.cache.get_seq_length() == 5


def test_a_prefill_on_a_cached_prefix_keeps_its_growing_layers(model):
    """The prefix cache hands the prefill GrowingLayers; the sequence's batch
    keeps them (no re-adoption, which would copy again at the next step)."""
    kv = KVBatch.single(_prefill(model, [1, 2, 3, 4, 5]).past_key_values)
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([[6, 7]]), past_key_values=kv.copy_prefix(5))
    again = KVBatch.single(out.past_key_values)
    assert again.cache is out.past_key_values and again.columns == 7
    assert all(isinstance(layer, GrowingLayer) for layer in again.cache.layers)


def test_concat_left_pads_with_zeros_into_a_buffer_the_next_steps_grow_in_place(model):
    """Rows of different lengths stack left-padded (zeros under a 0 mask),
    each row's KV as it was; the buffer has room, so the next step writes
    in place, and the padded rows decode what each decodes alone."""
    prompts = [[5, 17, 300], [42, 9, 11, 800, 7, 3], [1, 2]]
    alone = [KVBatch.single(_prefill(model, p).past_key_values) for p in prompts]
    batch = KVBatch.concat([alone[0], KVBatch.concat(alone[1:])])
    assert batch.rows == 3 and batch.columns == 6
    assert batch.mask.tolist() == [[0, 0, 0, 1, 1, 1], [1] * 6, [0, 0, 0, 0, 1, 1]]
    for layer, *singles in zip(batch.cache.layers, *(a.cache.layers for a in alone), strict=True):
        for row, single in enumerate(singles):
            n = single.keys.shape[2]
            assert torch.equal(layer.keys[row, :, 6 - n :], single.keys[0])
            assert torch.equal(layer.values[row, :, 6 - n :], single.values[0])
            assert not layer.keys[row, :, : 6 - n].any() and not layer.values[row, :, : 6 - n].any()
    buffer = batch.cache.layers[0]._key_buf.data_ptr()
    tokens = torch.tensor([[21], [22], [23]])
    with torch.inference_mode():
        logits = model(
            input_ids=tokens,
            attention_mask=batch.step_mask(),
            position_ids=batch.lengths()[:, None],
            past_key_values=batch.cache,
        ).logits[:, -1]
        batch.grew()
        for row, single in enumerate(alone):
            want = model(input_ids=tokens[row : row + 1], past_key_values=single.cache).logits
            torch.testing.assert_close(logits[row], want[0, -1], atol=1e-5, rtol=1e-5)
    assert batch.cache.layers[0]._key_buf.data_ptr() == buffer
    assert batch.cache.get_seq_length() == 7
