"""The compiled Triton paged-attention kernels on a GPU against a float32 PyTorch reference.

Every case draws fresh random inputs (its seed is in the failure message), poisons the output
and every cache slot outside the contexts with NaN, and bounds ‖out − ref‖ / ‖ref‖.
"""

import os

import pytest
import torch

pytestmark = pytest.mark.gpu
pytest.importorskip("triton")

from soberana.ops.triton.attention import (  # noqa: E402
    DecodeConfig,
    paged_decode_attention,
    paged_prefill_attention,
    reshape_and_cache,
    triton_paged_attention,
)
from tests.ops.paged_attention_cases import (  # noqa: E402
    make_step,
    reference_attention,
    relative_error,
)

# bf16 rounds P before the PV product and the output once: ~4e-3 typical, 1e-2 bound.
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}
GROUPS = [1, 4, 8]
HEAD_DIMS = [64, 128]
BLOCK_SIZES = [16, 32]


def _step(contexts, queries, *, group=4, head_dim=128, block_size=16, dtype=torch.bfloat16,
          num_kv_heads=8):  # fmt: skip
    seed = int.from_bytes(os.urandom(4), "little")
    step = make_step(
        contexts,
        queries,
        num_heads=group * num_kv_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        block_size=block_size,
        dtype=dtype,
        device="cuda",
        generator=torch.Generator().manual_seed(seed),
    )
    return step, seed


def _assert_close(out, step, seed, rows=slice(None)):
    torch.cuda.synchronize()
    assert not torch.isnan(out[rows]).any(), f"unwritten or NaN outputs (seed {seed})"
    err = relative_error(out[rows], reference_attention(step, query_chunk=256)[rows])
    assert err < TOLERANCE[out.dtype], f"relative error {err:.2e} (seed {seed})"


def _poisoned(q):
    return torch.full_like(q, float("nan"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_reshape_and_cache_writes_every_slot_and_skips_padding(dtype, head_dim, block_size):
    num_blocks, heads, tokens = 300, 8, 1000
    k_cache = torch.full((num_blocks, block_size, heads, head_dim), float("nan"), dtype=dtype,
                         device="cuda")  # fmt: skip
    v_cache = torch.full_like(k_cache, float("nan"))
    qkv = torch.randn(tokens, 3, heads, head_dim, device="cuda").to(dtype)
    slots = torch.randperm(num_blocks * block_size, device="cuda")[:tokens]
    slots[::7] = -1

    reshape_and_cache(qkv[:, 1], qkv[:, 2], k_cache, v_cache, slots)

    kept = slots >= 0
    k_flat, v_flat = k_cache.view(-1, heads, head_dim), v_cache.view(-1, heads, head_dim)
    assert torch.equal(k_flat[slots[kept]], qkv[kept, 1])
    assert torch.equal(v_flat[slots[kept]], qkv[kept, 2])
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool, device="cuda")
    untouched[slots[kept]] = False
    assert torch.isnan(k_flat[untouched].float()).all()
    assert torch.isnan(v_flat[untouched].float()).all()


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_decode_matches_reference_from_1_to_32k_tokens(group, head_dim, block_size):
    contexts = [1, 2, 17, 100, 1000, 4097, 32768]
    step, seed = _step(contexts, [1] * len(contexts), group=group, head_dim=head_dim,
                       block_size=block_size)  # fmt: skip
    out = paged_decode_attention(step.q, step.k_cache, step.v_cache, step.seq_lens,
                                 step.block_table, step.scale, out=_poisoned(step.q))  # fmt: skip
    _assert_close(out, step, seed)


@pytest.mark.parametrize("num_splits", [1, 3, 16, 64])
def test_decode_split_k_gives_the_same_answer_for_any_split_count(num_splits):
    step, seed = _step([1, 33, 5000, 32768], [1, 1, 1, 1])
    config = DecodeConfig(tile_n=64, num_warps=4, num_stages=3, num_splits=num_splits)
    out = paged_decode_attention(step.q, step.k_cache, step.v_cache, step.seq_lens,
                                 step.block_table, step.scale, out=_poisoned(step.q),
                                 config=config)  # fmt: skip
    _assert_close(out, step, seed)


@pytest.mark.parametrize("batch", [64, 256])
def test_decode_of_large_ragged_batches(batch):
    contexts = torch.randint(1, 3000, (batch,)).tolist()
    step, seed = _step(contexts, [1] * batch)
    out = paged_decode_attention(step.q, step.k_cache, step.v_cache, step.seq_lens,
                                 step.block_table, step.scale, out=_poisoned(step.q))  # fmt: skip
    _assert_close(out, step, seed)


def test_decode_of_zero_length_padding_rows_is_zero():
    step, seed = _step([0, 700, 0, 5], [1, 1, 1, 1])
    out = paged_decode_attention(step.q, step.k_cache, step.v_cache, step.seq_lens,
                                 step.block_table, step.scale, out=_poisoned(step.q))  # fmt: skip
    assert torch.equal(out[0::2], torch.zeros_like(out[0::2]))
    _assert_close(out, step, seed)


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_prefill_matches_reference_with_prefix_hits_and_chunks(group, head_dim, block_size):
    # Fresh prompts, a prefix hit (3996 cached), a 512-token chunk ending a 32k context,
    # a prefix hit leaving one token, and a short chunk behind a non-aligned prefix.
    contexts = [37, 300, 2048, 4096, 32768, 1000, 17]
    queries = [37, 300, 2048, 100, 512, 1, 5]
    step, seed = _step(contexts, queries, group=group, head_dim=head_dim, block_size=block_size)
    out = paged_prefill_attention(
        step.q, step.k_cache, step.v_cache, step.query_start_loc, step.seq_lens,
        step.block_table, step.scale, step.max_query_len, out=_poisoned(step.q),
    )  # fmt: skip
    _assert_close(out, step, seed)


def test_prefill_of_a_32k_prompt_in_one_step():
    step, seed = _step([32768], [32768])
    out = paged_prefill_attention(
        step.q, step.k_cache, step.v_cache, step.query_start_loc, step.seq_lens,
        step.block_table, step.scale, step.max_query_len, out=_poisoned(step.q),
    )  # fmt: skip
    _assert_close(out, step, seed)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_step_writes_new_keys_then_attends(dtype):
    # Decodes (one of them batch padding) first, then a fresh prompt and a prefix hit.
    contexts = [513, 1, 20000, 0, 700, 5000]
    queries = [1, 1, 1, 1, 700, 333]
    step, seed = _step(contexts, queries, dtype=dtype)
    written = step.slot_mapping[step.slot_mapping >= 0]
    for cache in (step.k_cache, step.v_cache):
        cache.view(-1, *cache.shape[2:])[written] = float("nan")
    reshape_and_cache(step.new_keys, step.new_values, step.k_cache, step.v_cache,
                      step.slot_mapping)  # fmt: skip
    out = triton_paged_attention(step.q, step.k_cache, step.v_cache, step.meta, step.scale,
                                 out=_poisoned(step.q))  # fmt: skip
    assert torch.equal(out[3], torch.zeros_like(out[3]))
    _assert_close(out, step, seed)


@pytest.mark.parametrize(
    ("dtype", "head_dim"),
    [(torch.float16, 128), (torch.float32, 128), (torch.float32, 64), (torch.bfloat16, 32),
     (torch.bfloat16, 256), (torch.bfloat16, 96)],
)  # fmt: skip
def test_other_dtypes_and_head_dims(dtype, head_dim):
    step, seed = _step([1, 700, 300, 1500], [1, 1, 300, 77], head_dim=head_dim, dtype=dtype)
    out = triton_paged_attention(step.q, step.k_cache, step.v_cache, step.meta, step.scale,
                                 out=_poisoned(step.q))  # fmt: skip
    _assert_close(out, step, seed)


def test_decode_replays_in_a_cuda_graph_with_new_lengths():
    step, _ = _step([100, 3000, 17], [1, 1, 1])
    out = torch.empty_like(step.q)

    def decode():
        paged_decode_attention(step.q, step.k_cache, step.v_cache, step.seq_lens,
                               step.block_table, step.scale, out=out)  # fmt: skip

    decode()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode()
    # Next step: shorter contexts and new queries, written into the captured tensors.
    new_lens = [50, 2999, 3]
    step.seq_lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
    step.q.copy_(torch.randn_like(step.q))
    step.keys = [k[:n] for k, n in zip(step.keys, new_lens, strict=True)]
    step.values = [v[:n] for v, n in zip(step.values, new_lens, strict=True)]
    out.fill_(float("nan"))
    graph.replay()
    _assert_close(out, step, seed=None)


def test_mixed_step_replays_in_a_cuda_graph_with_new_lengths():
    step, _ = _step([600, 40, 900, 300], [1, 1, 200, 300])
    out = torch.empty_like(step.q)
    meta = step.meta

    def attend():
        triton_paged_attention(step.q, step.k_cache, step.v_cache, meta, step.scale, out=out)

    attend()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        attend()
    # Next step with the same token and request counts: other lengths, other query split.
    new_contexts, new_queries = [500, 40, 850, 300], [1, 1, 201, 299]
    starts = torch.tensor([0, 1, 2, 203, 502], dtype=torch.int32)
    step.seq_lens.copy_(torch.tensor(new_contexts, dtype=torch.int32))
    step.query_start_loc.copy_(starts)
    step.q.copy_(torch.randn_like(step.q))
    step.keys = [k[:n] for k, n in zip(step.keys, new_contexts, strict=True)]
    step.values = [v[:n] for v, n in zip(step.values, new_contexts, strict=True)]
    step.query_lens = new_queries
    out.fill_(float("nan"))
    graph.replay()
    _assert_close(out, step, seed=None)
