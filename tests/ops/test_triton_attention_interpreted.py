"""The Triton paged-attention kernels' logic, run by Triton's CPU interpreter on tiny shapes.

Float32 and float16 only: the interpreter keeps bfloat16 as raw uint16 bits and multiplies
those in `tl.dot` (Triton 3.6), so bfloat16 accuracy is checked on a GPU in tests/gpu.
"""


import pytest
import torch

from tests.ops.interpreted import INTERPRETED

pytest.importorskip("triton")
pytestmark = INTERPRETED

from soberana.ops.triton.attention import (  # noqa: E402
    DecodeConfig,
    PrefillConfig,
    paged_decode_attention,
    paged_prefill_attention,
    reshape_and_cache,
    triton_paged_attention,
)
from tests.ops.paged_attention_cases import (  # noqa: E402
    make_step,
    reference_attention,
    relative_error,
    with_fp8_cache,
)

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3}


def _step(context_lens, query_lens, *, group=4, num_kv_heads=2, head_dim=32, block_size=4,
          dtype=torch.float32, seed=0):  # fmt: skip
    return make_step(
        context_lens,
        query_lens,
        num_heads=group * num_kv_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        block_size=block_size,
        dtype=dtype,
        device="cpu",
        generator=torch.Generator().manual_seed(seed),
    )


def _poisoned(q):
    return torch.full_like(q, float("nan"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reshape_and_cache_writes_each_token_to_its_slot_and_skips_minus_one(dtype):
    num_blocks, block_size, heads, dim = 5, 4, 2, 32
    k_cache = torch.full((num_blocks, block_size, heads, dim), float("nan"), dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    # Keys and values as strided views of one fused projection, as a model produces them.
    qkv = torch.randn(6, 3, heads, dim).to(dtype)
    key, value = qkv[:, 1], qkv[:, 2]
    slot_mapping = torch.tensor([17, 0, -1, 5, 19, 8], dtype=torch.int64)

    reshape_and_cache(key, value, k_cache, v_cache, slot_mapping)

    k_flat, v_flat = k_cache.view(-1, heads, dim), v_cache.view(-1, heads, dim)
    for token, slot in enumerate(slot_mapping.tolist()):
        if slot >= 0:
            assert torch.equal(k_flat[slot], key[token])
            assert torch.equal(v_flat[slot], value[token])
    written = {s for s in slot_mapping.tolist() if s >= 0}
    untouched = [s for s in range(num_blocks * block_size) if s not in written]
    assert torch.isnan(k_flat[untouched].float()).all()
    assert torch.isnan(v_flat[untouched].float()).all()


def test_reshape_and_cache_into_an_fp8_cache_rounds_and_saturates_as_the_cpu_path():
    from soberana.ops.attention import to_kv_cache_dtype

    fp8 = torch.float8_e4m3fn
    k_cache = torch.zeros(3, 4, 2, 32, dtype=fp8)
    v_cache = torch.zeros_like(k_cache)
    key, value = torch.randn(5, 2, 32) * 100, (torch.randn(5, 2, 32) * 0.01).half()
    key[0, 0, :5] = torch.tensor([1000.0, -1000.0, 448.0, 1e-3, -1e-4])  # saturate, keep,
    # subnormal, and a negative value that rounds to -0.0 (compiled Triton once stored +0.0)
    slots = torch.tensor([3, 0, 11, -1, 7], dtype=torch.int64)
    reshape_and_cache(key, value, k_cache, v_cache, slots)
    for token, slot in enumerate(slots.tolist()):  # the same bytes, -0.0 included
        if slot >= 0:
            k = k_cache.view(-1, 2, 32)[slot].view(torch.uint8)
            assert torch.equal(k, to_kv_cache_dtype(key[token], fp8).view(torch.uint8))
            v = v_cache.view(-1, 2, 32)[slot].view(torch.uint8)
            assert torch.equal(v, to_kv_cache_dtype(value[token], fp8).view(torch.uint8))
    assert k_cache.view(-1, 2, 32)[3, 0, :2].float().tolist() == [448.0, -448.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kind", ["decode", "prefill", "mixed"])
def test_an_fp8_cache_is_read_as_it_stores_keys_and_values(dtype, kind):
    """--kv-cache-dtype fp8 on GPUs: queries in the model dtype, keys and values widened from
    float8_e4m3fn in registers; equal to attention over the fp8-rounded keys/values."""
    contexts, queries = {"decode": ([1, 5, 33, 100], [1, 1, 1, 1]),
                         "prefill": ([7, 40, 61], [7, 9, 20]),
                         "mixed": ([12, 1, 45, 30], [1, 1, 30, 17])}[kind]  # fmt: skip
    step = _step(contexts, queries, group=4, dtype=dtype)
    exact = reference_attention(step)  # with keys/values in the model dtype
    step = with_fp8_cache(step)
    out = triton_paged_attention(step.q, step.k_cache, step.v_cache, step.meta, step.scale,
                                 out=_poisoned(step.q))  # fmt: skip
    assert relative_error(out, reference_attention(step)) < TOLERANCE[dtype]
    assert relative_error(out, exact) > 1e-3  # the cache really is fp8


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_matches_reference_on_ragged_contexts(dtype, group, block_size, num_splits):
    contexts = [1, 5, 16, 33, 100]
    step = _step(contexts, [1] * len(contexts), group=group, block_size=block_size, dtype=dtype)
    out = paged_decode_attention(
        step.q, step.k_cache, step.v_cache, step.seq_lens, step.block_table, step.scale,
        out=_poisoned(step.q), config=DecodeConfig(tile_n=16, num_warps=4, num_stages=2,
                                                   num_splits=num_splits),
    )  # fmt: skip
    assert relative_error(out, reference_attention(step)) < TOLERANCE[dtype]


def test_decode_result_does_not_depend_on_the_split_count():
    step = _step([3, 70, 129], [1, 1, 1], group=1)
    outs = [
        paged_decode_attention(
            step.q,
            step.k_cache,
            step.v_cache,
            step.seq_lens,
            step.block_table,
            step.scale,
            config=DecodeConfig(tile_n=16, num_warps=4, num_stages=2, num_splits=n),
        )  # fmt: skip
        for n in (1, 2, 7, 16)
    ]
    for out in outs[1:]:
        assert relative_error(out, outs[0]) < 1e-6


def test_decode_of_a_zero_length_padding_sequence_is_zero():
    step = _step([0, 9, 0], [1, 1, 1])
    out = paged_decode_attention(
        step.q, step.k_cache, step.v_cache, step.seq_lens, step.block_table, step.scale,
        out=_poisoned(step.q), config=DecodeConfig(tile_n=16, num_warps=4, num_stages=2,
                                                   num_splits=2),
    )  # fmt: skip
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    assert relative_error(out[1], reference_attention(step)[1]) < 1e-5


PREFILL_CONFIGS = [None, PrefillConfig(block_m=16, block_n=16, num_warps=4, num_stages=1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("config", PREFILL_CONFIGS, ids=["default", "small-tiles"])
def test_prefill_matches_reference_with_prefix_hits_and_chunks(dtype, group, block_size, config):
    # A fresh prompt, a prefix-cache hit, a chunk in the middle of a long prompt, a fresh
    # prompt of one block, and a prefix hit that leaves a single token to compute.
    contexts = [7, 40, 61, 16, 50]
    queries = [7, 9, 20, 16, 1]
    step = _step(contexts, queries, group=group, block_size=block_size, dtype=dtype)
    out = paged_prefill_attention(
        step.q, step.k_cache, step.v_cache, step.query_start_loc, step.seq_lens,
        step.block_table, step.scale, step.max_query_len, out=_poisoned(step.q), config=config,
    )  # fmt: skip
    assert relative_error(out, reference_attention(step)) < TOLERANCE[dtype]


@pytest.mark.parametrize("max_query_len", [1, 3, 500])
def test_prefill_max_query_len_is_only_a_tile_size_hint(max_query_len):
    step = _step([30, 64], [30, 21])
    out = paged_prefill_attention(
        step.q, step.k_cache, step.v_cache, step.query_start_loc, step.seq_lens,
        step.block_table, step.scale, max_query_len, out=_poisoned(step.q),
    )  # fmt: skip
    assert relative_error(out, reference_attention(step)) < 1e-5


def test_prefill_supports_a_head_dim_that_is_not_a_power_of_two():
    step = _step([20, 35], [20, 11], head_dim=24)
    out = paged_prefill_attention(
        step.q, step.k_cache, step.v_cache, step.query_start_loc, step.seq_lens,
        step.block_table, step.scale, step.max_query_len, out=_poisoned(step.q),
    )  # fmt: skip
    assert relative_error(out, reference_attention(step)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_mixed_step_runs_decodes_and_prefills_and_writes_every_row(dtype):
    step = _step([12, 1, 45, 30, 64], [1, 1, 1, 30, 17], dtype=dtype)
    assert step.num_decodes == 3
    out = triton_paged_attention(
        step.q, step.k_cache, step.v_cache, step.meta, step.scale, out=_poisoned(step.q)
    )
    assert not torch.isnan(out).any()
    assert relative_error(out, reference_attention(step)) < TOLERANCE[dtype]


def test_keys_written_by_slot_are_the_ones_attention_reads():
    # The engine's order within a layer: write this step's K/V, then attend.
    step = _step([12, 0, 45, 30], [1, 1, 20, 30], dtype=torch.float16)
    written = step.slot_mapping[step.slot_mapping >= 0]
    for cache in (step.k_cache, step.v_cache):
        cache.view(-1, *cache.shape[2:])[written] = float("nan")
    reshape_and_cache(step.new_keys, step.new_values, step.k_cache, step.v_cache,
                      step.slot_mapping)  # fmt: skip
    out = triton_paged_attention(step.q, step.k_cache, step.v_cache, step.meta, step.scale)
    assert relative_error(out, reference_attention(step)) < TOLERANCE[torch.float16]


def test_a_step_of_only_decodes_or_only_prefills_uses_one_kernel_each():
    decodes = _step([5, 9], [1, 1])
    prefills = _step([5, 9], [5, 3])
    for step in (decodes, prefills):
        out = triton_paged_attention(step.q, step.k_cache, step.v_cache, step.meta, step.scale)
        assert relative_error(out, reference_attention(step)) < 1e-5


def test_bad_arguments_raise_value_errors_that_name_them():
    step = _step([8], [8])
    args = (step.query_start_loc, step.seq_lens, step.block_table, step.scale, 8)
    with pytest.raises(ValueError, match="not a multiple"):
        paged_prefill_attention(step.q[:, :3], step.k_cache, step.v_cache, *args)
    with pytest.raises(ValueError, match="block_table"):
        paged_prefill_attention(
            step.q, step.k_cache, step.v_cache, step.query_start_loc, step.seq_lens,
            step.block_table.long(), step.scale, 8,
        )  # fmt: skip
    with pytest.raises(ValueError, match="v_cache"):
        paged_prefill_attention(step.q, step.k_cache, step.v_cache.half(), *args)
    with pytest.raises(ValueError, match="slot_mapping"):
        reshape_and_cache(step.q[:, :2], step.q[:, :2], step.k_cache, step.v_cache,
                          torch.zeros(8, dtype=torch.int32))  # fmt: skip
    with pytest.raises(ValueError, match="one query token per sequence"):
        paged_decode_attention(step.q, step.k_cache, step.v_cache, step.seq_lens,
                               step.block_table, step.scale)  # fmt: skip
    meta = step.meta
    meta.num_decodes = 2
    with pytest.raises(ValueError, match="num_decodes"):
        triton_paged_attention(step.q, step.k_cache, step.v_cache, meta, step.scale)
