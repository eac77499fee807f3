"""The portable PyTorch paged attention (the CPU path) against a float32 reference.

The pool is poisoned with NaN everywhere a request does not own (paged_attention_cases), so
reading a slot past a context, or a block of another request, shows up as NaN in the output.
"""

import pytest
import torch

from soberana.ops import attention
from soberana.ops.attention import GatherWorkspace, paged_attention, write_kv
from tests.ops.paged_attention_cases import make_step, reference_attention, relative_error

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _step(context_lens, query_lens, *, group=1, num_kv_heads=2, head_dim=32, block_size=16,
          dtype=torch.float32, seed=0):  # fmt: skip
    return make_step(
        context_lens, query_lens, num_heads=group * num_kv_heads, num_kv_heads=num_kv_heads,
        head_dim=head_dim, block_size=block_size, dtype=dtype, device="cpu",
        generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip


def _attend(step, workspace=None):
    meta = step.meta
    meta.workspace = workspace
    return paged_attention(step.q, step.new_keys, step.new_values, step.k_cache, step.v_cache,
                           meta, step.scale)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("block_size", [4, 16])
def test_decode_matches_reference_on_ragged_contexts(dtype, group, block_size):
    # Lengths far apart (several padded groups), equal ones, one inside the first block.
    contexts = [300, 1, 37, 300, 16, 129, 5, 290, 100]
    step = _step(contexts, [1] * len(contexts), group=group, block_size=block_size, dtype=dtype)
    for workspace in (None, GatherWorkspace()):
        out = _attend(step, workspace)
        assert relative_error(out, reference_attention(step)) < TOLERANCE[dtype]


def test_block_table_entries_past_a_requests_blocks_are_never_read():
    contexts = [70, 5, 33]
    step = _step(contexts, [1, 1, 1], block_size=4)
    for i, ctx in enumerate(contexts):
        step.block_table[i, -(-ctx // 4) :] = -1  # not even a valid block id
    out = _attend(step, GatherWorkspace())
    assert relative_error(out, reference_attention(step)) < 1e-5


def test_decode_result_does_not_depend_on_how_requests_are_chunked(monkeypatch):
    step = _step([40, 40, 40, 41, 200, 7], [1] * 6, group=2)
    whole = _attend(step)
    monkeypatch.setattr(attention, "_CHUNK_BYTES", 1)  # one request per chunk
    assert torch.allclose(_attend(step), whole, rtol=1e-6, atol=1e-6)
    assert relative_error(whole, reference_attention(step)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_step_of_decodes_fresh_prompts_and_prefix_hits_matches_reference(dtype):
    # Decodes first, then a fresh prompt, a prefix hit, a chunk of a long prompt.
    step = _step([12, 1, 45, 30, 64, 61], [1, 1, 1, 30, 17, 20], group=4, dtype=dtype)
    assert step.num_decodes == 3
    out = _attend(step, GatherWorkspace())
    assert not torch.isnan(out).any()
    assert relative_error(out, reference_attention(step)) < TOLERANCE[dtype]


def test_without_this_steps_keys_the_prefills_read_them_from_the_cache(dtype=torch.float32):
    step = _step([12, 1, 45, 30, 64, 61], [1, 1, 1, 30, 17, 20], group=4, dtype=dtype)
    out = paged_attention(step.q, None, None, step.k_cache, step.v_cache, step.meta, step.scale)
    assert torch.equal(out, _attend(step))


def test_keys_written_by_slot_are_the_ones_attention_reads():
    # The engine's order within a layer: write this step's K/V, then attend.
    step = _step([12, 45, 30], [1, 20, 30], group=2)
    written = step.slot_mapping
    for cache in (step.k_cache, step.v_cache):
        cache.view(-1, *cache.shape[2:])[written] = float("nan")
    write_kv(step.new_keys, step.new_values, step.k_cache, step.v_cache, step.slot_mapping)
    assert relative_error(_attend(step), reference_attention(step)) < 1e-5


def test_every_layer_of_a_step_reuses_the_first_layers_decode_plan():
    step = _step([20, 70, 9], [1, 1, 1])
    meta = step.meta
    first = attention.decode_groups(meta, step.k_cache)
    assert attention.decode_groups(meta, step.k_cache) is first
    # Requests are covered exactly once, whatever the grouping.
    rows = []
    for g in first:
        r = g.requests
        rows += list(range(r.start, r.stop)) if isinstance(r, slice) else r.tolist()
    assert sorted(rows) == [0, 1, 2]
