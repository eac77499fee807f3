"""The fused Triton kernels (RMSNorm, add + RMSNorm, rotary, SiLU-and-mul) run by Triton's
CPU interpreter on small shapes, against the PyTorch path of `soberana/ops/layers.py`.

Float32 and float16 only (tests/gpu covers bfloat16 on a GPU). Outputs are passed in
poisoned with NaN, so an element the kernel fails to write fails the test.
"""

import os

import pytest
import torch

from tests.ops.interpreted import INTERPRETED

pytest.importorskip("triton")
pytestmark = INTERPRETED

from soberana.ops.layers import (  # noqa: E402
    torch_rms_norm,
    torch_rotary_embedding,
    torch_silu_and_mul,
)
from soberana.ops.triton.layers import (  # noqa: E402
    fused_add_rms_norm,
    rms_norm,
    rotary_embedding,
    silu_and_mul,
)
from tests.ops.fused_cases import assert_matches, qkv_views, randn, rope_tables  # noqa: E402

DTYPES = [torch.float32, torch.float16]
EPS = 1e-5


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))


def _nan(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("num_tokens", "hidden"), [(1, 64), (5, 100), (3, 1030)])
def test_rms_norm_matches_the_torch_layer_for_any_row_width(dtype, num_tokens, hidden, gen):
    x = randn(num_tokens, hidden, dtype=dtype, device="cpu", gen=gen)
    weight = randn(hidden, dtype=dtype, device="cpu", gen=gen)
    out = rms_norm(x, weight, EPS, out=_nan(x.shape, dtype))
    assert_matches(out, torch_rms_norm(x, weight, EPS))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_normalises_each_head_of_a_strided_qkv_slice(dtype, gen):
    # Qwen3's per-head q/k norms: rows are (token, head) pairs of a fused projection's slice.
    q, k = qkv_views(7, 4, 2, 32, dtype=dtype, device="cpu", gen=gen)
    weight = randn(32, dtype=dtype, device="cpu", gen=gen)
    for x in (q, k):
        out = rms_norm(x, weight, EPS, out=_nan(x.shape, dtype))
        assert_matches(out, torch_rms_norm(x, weight, EPS))


def test_rms_norm_output_dtype_follows_torch_promotion_with_a_float32_weight(gen):
    x = randn(4, 48, dtype=torch.float16, device="cpu", gen=gen)
    weight = randn(48, dtype=torch.float32, device="cpu", gen=gen)
    out = rms_norm(x, weight, EPS)
    assert out.dtype == torch.float32
    assert_matches(out, torch_rms_norm(x, weight, EPS))


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm_returns_the_exact_sum_and_its_norm(dtype, gen):
    x, residual = (randn(6, 96, dtype=dtype, device="cpu", gen=gen) for _ in range(2))
    weight = randn(96, dtype=dtype, device="cpu", gen=gen)
    normed, summed = fused_add_rms_norm(
        x, residual, weight, EPS, out=_nan(x.shape, dtype), residual_out=_nan(x.shape, dtype)
    )
    assert torch.equal(summed, x + residual)
    assert_matches(normed, torch_rms_norm(x + residual, weight, EPS))


def test_fused_add_rms_norm_can_overwrite_its_inputs_in_place(gen):
    x, residual = (randn(5, 80, dtype=torch.float16, device="cpu", gen=gen) for _ in range(2))
    weight = randn(80, dtype=torch.float16, device="cpu", gen=gen)
    expect_sum = x + residual
    expect_norm = torch_rms_norm(expect_sum, weight, EPS)
    normed, summed = fused_add_rms_norm(x, residual, weight, EPS, out=x, residual_out=residual)
    assert normed.data_ptr() == x.data_ptr() and summed.data_ptr() == residual.data_ptr()
    assert torch.equal(residual, expect_sum)
    assert_matches(x, expect_norm)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [(4, 2, 32), (6, 1, 24)])
def test_rotary_matches_the_torch_layer_on_slices_of_a_fused_projection(
    dtype, num_heads, num_kv_heads, head_dim, gen
):
    q, k = qkv_views(9, num_heads, num_kv_heads, head_dim, dtype=dtype, device="cpu", gen=gen)
    cos, sin = rope_tables(head_dim, 64, "cpu")
    positions = torch.randint(0, 64, (9,), generator=gen)
    q_out, k_out = rotary_embedding(positions, q, k, cos, sin, q_out=_nan(q.shape, dtype),
                                    k_out=_nan(k.shape, dtype))  # fmt: skip
    q_ref, k_ref = torch_rotary_embedding(positions, q, k, cos, sin)
    # Same operations rounded at the same points as the eager chain: identical bits.
    assert torch.equal(q_out, q_ref) and torch.equal(k_out, k_ref)


def test_rotary_in_place_rotates_the_given_views_and_leaves_v_alone(gen):
    qkv = randn(5, 4 * 32 + 2 * 2 * 32, dtype=torch.float16, device="cpu", gen=gen)
    q, k = qkv[:, :128].view(5, 4, 32), qkv[:, 128:192].view(5, 2, 32)
    v_before = qkv[:, 192:].clone()
    cos, sin = rope_tables(32, 16, "cpu")
    positions = torch.tensor([0, 3, 15, 7, 7], dtype=torch.int32)
    q_ref, k_ref = torch_rotary_embedding(positions.long(), q, k, cos, sin)
    rotary_embedding(positions, q, k, cos, sin, q_out=q, k_out=k)
    assert torch.equal(q, q_ref) and torch.equal(k, k_ref)
    assert torch.equal(qkv[:, 192:], v_before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("num_tokens", "inter"), [(1, 40), (4, 1500)])
def test_silu_and_mul_matches_torch_on_a_strided_gate_up(dtype, num_tokens, inter, gen):
    # A row stride wider than 2 * I: gate_up as a slice of a wider buffer.
    wide = randn(num_tokens, 2 * inter + 8, dtype=dtype, device="cpu", gen=gen)
    gate_up = wide[:, : 2 * inter]
    out = silu_and_mul(gate_up, out=_nan((num_tokens, inter), dtype))
    assert_matches(out, torch_silu_and_mul(gate_up))


def test_zero_tokens_give_empty_outputs():
    weight = torch.ones(64)
    assert rms_norm(torch.empty(0, 64), weight, EPS).shape == (0, 64)
    normed, summed = fused_add_rms_norm(torch.empty(0, 64), torch.empty(0, 64), weight, EPS)
    assert normed.shape == summed.shape == (0, 64)
    cos, sin = rope_tables(32, 8, "cpu")
    q_out, k_out = rotary_embedding(
        torch.empty(0, dtype=torch.long), torch.empty(0, 4, 32), torch.empty(0, 2, 32), cos, sin
    )
    assert q_out.shape == (0, 4, 32) and k_out.shape == (0, 2, 32)
    assert silu_and_mul(torch.empty(0, 128)).shape == (0, 64)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: rms_norm(torch.randn(2, 8), torch.ones(6), EPS), "weight must be"),
        (lambda: rms_norm(torch.randn(8), torch.ones(8), EPS), "x must be"),
        (lambda: rms_norm(torch.randn(4, 8).t(), torch.ones(4), EPS), "contiguous in its last"),
        (lambda: fused_add_rms_norm(torch.randn(2, 8), torch.randn(3, 8), torch.ones(8), EPS),
         "residual must have shape"),
        (lambda: rotary_embedding(torch.zeros(2, dtype=torch.long), torch.randn(2, 4, 32),
                                  torch.randn(3, 2, 32), *rope_tables(32, 4, "cpu")),
         "k must be"),
        (lambda: rotary_embedding(torch.zeros(2), torch.randn(2, 4, 32), torch.randn(2, 2, 32),
                                  *rope_tables(32, 4, "cpu")),
         "positions must be"),
        (lambda: silu_and_mul(torch.randn(2, 7)), "gate_up must be"),
    ],
)  # fmt: skip
def test_bad_arguments_raise_a_value_error_naming_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()
