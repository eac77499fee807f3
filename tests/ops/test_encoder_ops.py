"""The encoder's ops over packed batches (soberana/ops/encoder.py, csrc/encoder_layers.c): the
native attention and add + LayerNorm give what the PyTorch path gives, in the AVX-512 and the
AVX2 + FMA builds (the cpu_isa fixture), and the backend picks them once where they are
vectorised."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from soberana.engine.config import EngineConfig
from soberana.engine.core_process import _serves_pooling
from soberana.ops import backend
from soberana.ops import encoder as encoder_ops
from soberana.ops.backend import select_backend
from soberana.ops.cpu import kernels as cpu_kernels

CPU = torch.device("cpu")
# lengths around the kernel's blocks: 8 queries, 8 or 16 keys; one token; one long sequence
SEQ_LENS = [1, 7, 8, 9, 15, 16, 17, 33, 200, 3]
SIMD_NAMES = {"native": "AVX-512", "avx2": "AVX2+FMA"}


@pytest.fixture
def encoder_isa(cpu_isa):
    """The cpu_isa build, skipped where it has no vectorised encoder kernels."""
    lib = cpu_kernels.encoder_library()
    if lib is None or not lib.encoder_attention_simd():
        pytest.skip(f"no vectorised build of the encoder kernels for cpu_isa {cpu_isa}")
    return cpu_isa


@pytest.mark.parametrize("heads, head_dim", [(12, 32), (4, 64), (3, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_attention_equals_sdpa_by_length_groups(encoder_isa, heads, head_dim, dtype):
    torch.manual_seed(0)
    seqs = encoder_ops.PackedSeqs(SEQ_LENS, CPU)
    qkv = torch.randn(sum(SEQ_LENS), 3 * heads * head_dim).to(dtype)
    scale = head_dim**-0.5
    ours = encoder_ops.native_encoder_attention(qkv, seqs, heads, scale)
    ref = encoder_ops.torch_encoder_attention(qkv.float(), seqs, heads, scale)
    assert ours.dtype == dtype and ours.shape == ref.shape
    # float32: sums in another order; bfloat16: the float32 result rounded once
    tol = 2e-6 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(ours.float(), ref, atol=tol, rtol=tol)


def test_each_sequence_attends_only_to_itself(encoder_isa):
    torch.manual_seed(0)
    qkv = torch.randn(12, 3 * 2 * 16)
    alone = encoder_ops.native_encoder_attention(qkv[:5], encoder_ops.PackedSeqs([5], CPU), 2, 0.25)
    packed = encoder_ops.native_encoder_attention(qkv, encoder_ops.PackedSeqs([5, 7], CPU), 2, 0.25)
    torch.testing.assert_close(packed[:5], alone, atol=0, rtol=0)


def test_attention_refuses_a_layout_it_cannot_read(encoder_isa):
    qkv = torch.randn(6, 3 * 2 * 16)
    with pytest.raises(ValueError, match="encoder_attention: needs"):
        cpu_kernels.encoder_attention(qkv, torch.tensor([0, 5]), 2, 0.25)  # rows 5 of 6
    with pytest.raises(ValueError, match="unsupported"):  # head size 12: not a multiple of 16
        cpu_kernels.encoder_attention(torch.randn(6, 3 * 4 * 12), torch.tensor([0, 6]), 4, 0.3)


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("dtype, hidden", [(torch.float32, 384), (torch.bfloat16, 384),
                                           (torch.float32, 40), (torch.bfloat16, 40),
                                           (torch.float32, 36)])
def test_native_add_layer_norm_equals_torch(encoder_isa, dtype, hidden, residual):
    torch.manual_seed(0)
    x, res = (torch.randn(37, hidden).to(dtype) for _ in range(2))
    weight, bias = torch.randn(hidden).to(dtype), torch.randn(hidden).to(dtype)
    res = res if residual else None
    ours = cpu_kernels.add_layer_norm(x, res, weight, bias, 1e-12)
    ref = encoder_ops.torch_add_layer_norm(x, res, weight, bias, 1e-12)
    tol = 2e-6 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(ours.float(), ref.float(), atol=tol, rtol=tol)


def test_native_backend_serves_the_encoder_ops_and_torch_keeps_pytorchs(encoder_isa):
    native = select_backend("native", CPU, torch.float32, cpu_isa=encoder_isa)
    assert native.kernels.encoder_attention is encoder_ops.native_encoder_attention
    assert native.kernels.add_layer_norm is cpu_kernels.add_layer_norm
    assert native.implementations["encoder attention/LayerNorm"] == f"native {SIMD_NAMES[encoder_isa]}"
    plain = select_backend("torch", CPU, torch.float32)
    assert plain.kernels.encoder_attention is encoder_ops.torch_encoder_attention


def test_pooling_cores_are_recognised_before_torch_is_imported(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["BertModel"]}')
    assert _serves_pooling(EngineConfig(model=str(tmp_path)))
    assert _serves_pooling(EngineConfig(model="any", task="rerank"))
    assert not _serves_pooling(EngineConfig(model="demo"))
    assert not _serves_pooling(EngineConfig(model=str(tmp_path), task="generate"))


@pytest.mark.parametrize("preset", [None, "ACTIVE"])
def test_passive_openmp_is_set_unless_the_environment_says_otherwise(preset):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if preset:
        env["OMP_WAIT_POLICY"] = preset
    code = ("import os, sys; from soberana.engine.process_memory import prefer_passive_openmp; "
            "prefer_passive_openmp(); print(os.environ['OMP_WAIT_POLICY'], 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()  # fmt: skip
    assert out == [preset or "PASSIVE", "False"]


@pytest.mark.parametrize("dtype, capability, served", [
    (torch.bfloat16, (9, 0), encoder_ops.flash_varlen_encoder_attention),
    (torch.float16, (8, 0), encoder_ops.flash_varlen_encoder_attention),
    (torch.float32, (9, 0), encoder_ops.torch_encoder_attention),  # no fp32 FlashAttention
    (torch.bfloat16, (7, 5), encoder_ops.torch_encoder_attention),  # pre-Ampere
    (torch.bfloat16, None, encoder_ops.torch_encoder_attention),  # Triton interpreted on a CPU
])
def test_a_gpu_takes_flash_varlen_attention_where_it_runs(dtype, capability, served):
    """The chooser at the hardware boundary (the compute capability), run without a GPU; the
    kernel itself is checked against the SDPA path in tests/gpu/test_embeddings_gpu.py."""
    ops, described = backend.cuda_encoder_ops(dtype, capability)
    kernels = backend.with_kernels(backend.TORCH_KERNELS, **ops)
    assert kernels.encoder_attention is served
    assert kernels.add_layer_norm is encoder_ops.torch_add_layer_norm
    assert described.startswith("FlashAttention varlen" if ops else "PyTorch SDPA"), described


def test_flash_varlen_attention_binds_to_this_pytorchs_op():
    """The call reaches aten's FlashAttention varlen op with the arguments this PyTorch takes
    (its meta kernel, no GPU needed); its numbers are checked on a GPU (tests/gpu)."""
    meta = torch.device("meta")
    qkv = torch.empty(sum(SEQ_LENS), 3 * 4 * 16, dtype=torch.bfloat16, device=meta)
    out = encoder_ops.flash_varlen_encoder_attention(qkv, encoder_ops.PackedSeqs(SEQ_LENS, meta),
                                                     4, 0.25)  # fmt: skip
    assert out.shape == (sum(SEQ_LENS), 4 * 16) and out.dtype == torch.bfloat16
