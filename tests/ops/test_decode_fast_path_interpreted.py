"""The decode fast-path kernels (skinny GEMM with fused norm/activation, fused decode
attention) run by Triton's CPU interpreter on small shapes, against the unfused eager chain.

Float32 and float16 only (the interpreter mishandles bfloat16 in `tl.dot`); tests/gpu covers
bfloat16 at model shapes. Outputs start as NaN or the cache slots being written hold NaN, so
an element a kernel fails to write fails the test.
"""

import os

import pytest
import torch

pytest.importorskip("triton")
pytestmark = [
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") != "1",
        reason="interpreter tests run on machines without a GPU; tests/gpu covers GPUs",
    ),
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning"),
]

from soberana.ops.triton_decode_attention import DecodeConfig  # noqa: E402
from soberana.ops.triton_decode_fused import fused_decode_attention  # noqa: E402
from soberana.ops.triton_skinny_gemm import SkinnyConfig, skinny_gemm  # noqa: E402
from tests.ops.decode_fast_path_cases import (  # noqa: E402
    make_fused_decode_case,
    reference_skinny,
    written_slots,
)
from tests.ops.fused_cases import assert_matches, randn  # noqa: E402
from tests.ops.paged_attention_cases import relative_error  # noqa: E402

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3}


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))


def _inputs(m, n, k, dtype, gen, *, gated=False, bias=False):
    x = randn(m, k, dtype=dtype, device="cpu", gen=gen)
    w = randn(2 * n if gated else n, k, dtype=dtype, device="cpu", gen=gen) * k**-0.5
    b = randn(w.shape[0], dtype=dtype, device="cpu", gen=gen) if bias else None
    return x, w.to(dtype), b


def _close(out, ref, dtype):
    assert not torch.isnan(out).any()
    assert relative_error(out, ref) < TOLERANCE[dtype], relative_error(out, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dot", [True, False])
def test_skinny_gemm_equals_linear_for_each_batch_size(dtype, m, bias, dot, gen):
    x, w, b = _inputs(m, 40, 96, dtype, gen, bias=bias)
    out, res = skinny_gemm(x, w, b, config=SkinnyConfig(16, 32, 4, 1, dot))
    assert res is None and out.shape == (m, 40)
    _close(out, reference_skinny(x, w, b)[0], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m", [1, 5])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("dot", [True, False])
def test_skinny_gemm_fuses_add_and_rms_norm_before_the_projection(dtype, m, with_residual, dot,
                                                                 gen):  # fmt: skip
    x, w, _ = _inputs(m, 24, 80, dtype, gen)  # K not a multiple of BLOCK_K: masked tail
    residual = randn(m, 80, dtype=dtype, device="cpu", gen=gen) if with_residual else None
    g = randn(80, dtype=dtype, device="cpu", gen=gen)
    out, res = skinny_gemm(x, w, norm_weight=g, eps=1e-5, residual=residual,
                           config=SkinnyConfig(16, 32, 4, 1, dot))
    ref, ref_res = reference_skinny(x, w, norm_weight=g, eps=1e-5, residual=residual)
    _close(out, ref, dtype)
    # The new residual stream is the rounded sum, exactly; without one it is x itself.
    assert torch.equal(res, ref_res)
    if not with_residual:
        assert res is x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m", [1, 4])
@pytest.mark.parametrize("dot", [True, False])
def test_skinny_gemm_gated_writes_silu_of_gate_times_up(dtype, m, dot, gen):
    x, w, b = _inputs(m, 48, 64, dtype, gen, gated=True, bias=True)
    residual = randn(m, 64, dtype=dtype, device="cpu", gen=gen)
    g = randn(64, dtype=dtype, device="cpu", gen=gen)
    out, _ = skinny_gemm(x, w, b, norm_weight=g, residual=residual, gated=True,
                         config=SkinnyConfig(16, 32, 4, 1, dot))
    assert out.shape == (m, 48)
    ref, _ = reference_skinny(x, w, b, norm_weight=g, residual=residual, gated=True)
    _close(out, ref, dtype)


def test_skinny_gemm_rows_do_not_depend_on_the_batch_they_are_in(gen):
    # With the matrix-unit path (the default) a row's result is the same whatever else is
    # in the batch: per-request seeds then sample the same tokens in any batch.
    x, w, _ = _inputs(9, 40, 96, torch.float16, gen)
    alone, _ = skinny_gemm(x[2:3], w, config=SkinnyConfig(16, 32, 4, 1))
    batched, _ = skinny_gemm(x, w, config=SkinnyConfig(16, 32, 4, 1))
    assert torch.equal(alone[0], batched[2])


def test_skinny_gemm_rejects_what_it_cannot_compute():
    x = torch.zeros(17, 8)
    with pytest.raises(ValueError, match="M <= 16"):
        skinny_gemm(x, torch.zeros(4, 8))
    with pytest.raises(ValueError, match="weight"):
        skinny_gemm(torch.zeros(2, 8), torch.zeros(4, 6))
    with pytest.raises(ValueError, match="norm_weight"):
        skinny_gemm(torch.zeros(2, 8), torch.zeros(4, 8), residual=torch.zeros(2, 8))
    with pytest.raises(ValueError, match="gated"):
        skinny_gemm(torch.zeros(2, 8), torch.zeros(5, 8), gated=True)


def _run_fused(case, num_splits=None, tile_n=16):
    cfg = DecodeConfig(tile_n=tile_n, num_warps=4, num_stages=2, num_splits=num_splits)
    return fused_decode_attention(
        case.qkv, case.positions, case.cos, case.sin, case.slot_mapping, case.k_cache,
        case.v_cache, case.seq_lens, case.block_table, case.num_heads, case.scale,
        q_norm=case.q_norm, k_norm=case.k_norm, config=cfg,
    )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_splits", [1, 3, 8])
@pytest.mark.parametrize("group", [1, 4])
def test_fused_decode_equals_rotary_then_cache_write_then_attention(dtype, num_splits, group,
                                                                    gen):  # fmt: skip
    # Contexts: the new token alone, under one tile, within one partition, and long enough
    # for several partitions of MIN_TILES tiles (a ragged last one).
    case = make_fused_decode_case([1, 7, 40, 230], num_heads=2 * group, num_kv_heads=2,
                                  head_dim=32, block_size=4, dtype=dtype, device="cpu",
                                  gen=gen)  # fmt: skip
    out = _run_fused(case, num_splits)
    _close(out, case.ref_out, dtype)
    keys, values = written_slots(case)
    # The stored key is the eager chain's rotated key, bit for bit.
    assert torch.equal(keys, case.ref_k) and torch.equal(values, case.ref_v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_decode_applies_per_head_qk_norm_first(dtype, gen):
    case = make_fused_decode_case([5, 100], num_heads=8, num_kv_heads=2, head_dim=16,
                                  block_size=4, dtype=dtype, device="cpu", gen=gen,
                                  qk_norm=True)  # fmt: skip
    _close(_run_fused(case, num_splits=2), case.ref_out, dtype)
    keys, _ = written_slots(case)
    # Equal up to the order of the norm's float32 sum (a flipped rounding at most).
    assert_matches(keys, case.ref_k)


def test_fused_decode_padding_rows_write_nothing_and_attend_to_nothing(gen):
    case = make_fused_decode_case([9, 0, 70], num_heads=4, num_kv_heads=2, head_dim=16,
                                  block_size=4, dtype=torch.float32, device="cpu", gen=gen)  # fmt: skip
    before_k = case.k_cache.clone()
    out = _run_fused(case, num_splits=4)
    _close(out, case.ref_out, torch.float32)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    # Only the two real rows' slots changed.
    changed = (case.k_cache != before_k) & ~(case.k_cache.isnan() & before_k.isnan())
    assert changed.any(dim=(2, 3)).sum() == 2


def test_fused_decode_counters_reset_so_repeated_launches_agree(gen):
    case = make_fused_decode_case([150, 3, 90], num_heads=4, num_kv_heads=2, head_dim=16,
                                  block_size=4, dtype=torch.float32, device="cpu", gen=gen)  # fmt: skip
    first = _run_fused(case, num_splits=5)
    again = _run_fused(case, num_splits=5)
    assert torch.equal(first, again)
    _close(again, case.ref_out, torch.float32)
