"""The PyTorch path of `soberana/ops/layers.py` rounds exactly where transformers' Llama does.

CPU generation is compared token for token with transformers, so RMSNorm, rotary and the
SiLU-gated activation must give bit-identical results to the transformers modules, in
float32 and in half precision, on contiguous and on strided (fused-projection) inputs.
"""

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from soberana.ops.layers import RotaryEmbedding, torch_rms_norm, torch_silu_and_mul
from tests.ops.fused_cases import qkv_views, randn

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_is_bit_identical_to_transformers(dtype):
    gen = torch.Generator().manual_seed(0)
    hf = LlamaRMSNorm(96, eps=1e-5).to(dtype)
    with torch.no_grad():
        hf.weight.copy_(randn(96, dtype=dtype, device="cpu", gen=gen))
        x = randn(37, 96, dtype=dtype, device="cpu", gen=gen) * 3
        q, _ = qkv_views(5, 4, 2, 24, dtype=dtype, device="cpu", gen=gen)  # Qwen3's q norm
        for inp, norm in ((x, hf), (q, LlamaRMSNorm(24, eps=1e-6).to(dtype))):
            before = inp.clone()
            assert torch.equal(torch_rms_norm(inp, norm.weight, norm.variance_epsilon), norm(inp))
            assert torch.equal(inp, before)  # the input is never written


def test_rms_norm_with_a_float32_weight_promotes_like_transformers():
    gen = torch.Generator().manual_seed(1)
    x = randn(4, 32, dtype=torch.bfloat16, device="cpu", gen=gen)
    hf = LlamaRMSNorm(32, eps=1e-6)  # float32 weight
    out = torch_rms_norm(x, hf.weight, 1e-6)
    assert out.dtype == torch.float32 and torch.equal(out, hf(x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_is_bit_identical_to_transformers(dtype):
    gen = torch.Generator().manual_seed(2)
    head_dim, max_pos = 64, 300
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    rope = RotaryEmbedding(inv_freq, max_pos)
    positions = torch.tensor([0, 1, 7, 150, 299, 42])
    q, k = qkv_views(len(positions), 8, 2, head_dim, dtype=dtype, device="cpu", gen=gen)
    # transformers' tables: computed per call in float32, then cast to the model dtype.
    freqs = positions[:, None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    # [T, H, D] with unsqueeze_dim=1 broadcasts the [T, D] tables over heads.
    hf_q, hf_k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
    q_before, k_before = q.clone(), k.clone()
    our_q, our_k = rope(positions, q, k)
    assert torch.equal(our_q, hf_q) and torch.equal(our_k, hf_k)
    assert torch.equal(q, q_before) and torch.equal(k, k_before)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_is_bit_identical_to_transformers_mlp_activation(dtype):
    gen = torch.Generator().manual_seed(3)
    gate_up = randn(9, 2 * 80, dtype=dtype, device="cpu", gen=gen) * 4
    gate, up = gate_up[:, :80], gate_up[:, 80:]
    expected = torch.nn.functional.silu(gate) * up  # LlamaMLP: act_fn(gate_proj(x)) * up_proj(x)
    before = gate_up.clone()
    assert torch.equal(torch_silu_and_mul(gate_up), expected)
    assert torch.equal(gate_up, before)
