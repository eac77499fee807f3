"""Verification steps of speculative decoding in CUDA-graph buckets (engine/verify_graphs.py):
the layout (bucket choice, padding in front of each request's tokens, which steps fall back
to eager), and on CPU the padded bucket run through the model without a graph gives the
eager step's hidden states and KV. The captured graphs themselves: tests/gpu/test_spec_decode_gpu.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from soberana.engine.verify_graphs import VerifyGraphs, plan_verify_layout, verify_buckets
from soberana.models.loader import load_model
from soberana.ops.attention import AttentionMetadata
from tests.engine.tiny_models import build_tiny_model

BLOCK = 16


def test_buckets_stop_where_speculation_turns_off():
    assert verify_buckets(256, 32) == [1, 2, 4, 8, 16, 32]
    assert verify_buckets(8, 32) == [1, 2, 4, 8]
    assert verify_buckets(256, 40) == [1, 2, 4, 8, 16, 32, 40]


def test_layout_pads_in_front_of_each_request():
    # Q = 5 (k = 4): a request verifying 4 drafts, a plain decode, one verifying 2 drafts.
    layout = plan_verify_layout([5, 1, 3], [40, 17, 9], 5, [1, 2, 4, 8])
    assert layout.bucket == 4
    assert layout.rows.tolist() == [0, 1, 2, 3, 4, 9, 12, 13, 14]
    assert layout.seq_lens.tolist() == [40, 17, 9, 5]  # the padding request: Q slots
    # Every row sits where the kernel puts it: the last rows of its context.
    pos = layout.positions.reshape(4, 5)
    assert pos[0].tolist() == [35, 36, 37, 38, 39]
    assert pos[1].tolist() == [12, 13, 14, 15, 16]  # the decode's one real row: 16
    assert pos[2].tolist() == [4, 5, 6, 7, 8]
    assert pos[3].tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(("q_lens", "seq_lens", "why"), [
    ([6, 1], [40, 30], "a prefill chunk longer than Q"),
    ([1] * 9, [30] * 9, "more requests than the largest bucket"),
    ([2, 1], [40, 4], "a context shorter than Q: padding would precede position 0"),
    ([], [], "an empty step"),
])
def test_steps_that_run_eagerly(q_lens, seq_lens, why):
    assert plan_verify_layout(q_lens, seq_lens, 5, [1, 2, 4, 8]) is None, why


def test_bucket_sizes_match_the_requests():
    assert plan_verify_layout([1] * 3, [9] * 3, 5, [1, 2, 4, 8]).bucket == 4
    assert plan_verify_layout([5] * 8, [9] * 8, 5, [1, 2, 4, 8]).bucket == 8
    assert plan_verify_layout([5], [5], 5, [1, 2, 4, 8]).bucket == 1


def _meta(tables: list[list[int]], q_lens: list[int],
          seq_lens: list[int]) -> tuple[AttentionMetadata, torch.Tensor]:
    """The eager step's metadata and positions, as the model runner builds them (decodes
    first)."""
    q, s = np.array(q_lens), np.array(seq_lens)
    cu = np.concatenate([[0], np.cumsum(q)])
    positions = np.repeat(s - q, q) + (np.arange(cu[-1]) - np.repeat(cu[:-1], q))
    req = np.repeat(np.arange(len(q)), q)
    table = np.array(tables, dtype=np.int32)
    slots = table[req, positions // BLOCK].astype(np.int64) * BLOCK + positions % BLOCK
    return AttentionMetadata(
        slot_mapping=torch.from_numpy(slots), query_start_loc=torch.from_numpy(cu.astype(np.int32)),
        seq_lens=torch.from_numpy(s.astype(np.int32)), block_table=torch.from_numpy(table),
        num_decodes=int((q == 1).sum()), query_lens_cpu=q.tolist(), seq_lens_cpu=s.tolist(),
    ), torch.from_numpy(positions)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = build_tiny_model(tmp_path_factory.mktemp("verify-llama"), "llama", seed=3)
    return load_model(path, torch.float32, torch.device("cpu"), 256).model


@torch.inference_mode()
def test_padded_bucket_gives_the_eager_step_on_cpu(tiny):
    """Three requests with contexts in the cache (prefilled eagerly), then one step: a plain
    decode, a request verifying 4 drafts, one verifying 2 (k = 4, Q = 5; bucket 4 with one
    padding request). The bucket's rows equal the eager step's, and so does every KV slot
    the step writes; padding rows wrote only the scratch slot."""
    c = tiny.config
    num_blocks = 12
    cache = torch.zeros(c.num_layers, 2, num_blocks + 1, BLOCK, c.num_kv_heads, c.head_dim)
    tables = [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    gen = torch.Generator().manual_seed(0)
    contexts = [20, 33, 7]
    meta, pos = _meta(tables, contexts, contexts)
    ids = torch.randint(0, c.vocab_size, (sum(contexts),), generator=gen)
    tiny(ids, pos, cache, meta)  # the contexts' KV

    q_lens = [1, 5, 3]
    seq_lens = [n + q for n, q in zip(contexts, q_lens)]
    meta, pos = _meta(tables, q_lens, seq_lens)
    step_ids = torch.randint(0, c.vocab_size, (sum(q_lens),), generator=gen)
    eager_cache = cache.clone()
    eager = tiny(step_ids, pos, eager_cache, meta)

    graphs = VerifyGraphs(tiny, cache, num_speculative_tokens=4, max_num_seqs=8,
                          disable_by_batch_size=32, max_blocks_per_seq=4,
                          device=torch.device("cpu"), use_graphs=False,
                          pad_slot=num_blocks * BLOCK)
    layout = graphs.plan(meta)
    assert layout is not None and layout.bucket == 4
    ours = graphs.run(layout, step_ids, meta.slot_mapping, meta.block_table)
    assert graphs.num_replays == 1
    assert ours.shape == eager.shape
    torch.testing.assert_close(ours, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache[:, :, :num_blocks], eager_cache[:, :, :num_blocks],
                               rtol=1e-5, atol=1e-5)
    # Padding wrote the scratch block's first slot only.
    assert cache[:, :, num_blocks, 1:].abs().sum() == 0
