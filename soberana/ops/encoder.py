"""The ops of a bidirectional encoder over a packed batch: attention of variable-length
sequences and residual add + LayerNorm.

The `torch_*` functions are the portable PyTorch path: attention runs over groups of similar
length (`length_groups`), each padded to its longest member, one SDPA per group. The native
CPU path (`csrc/encoder_layers.c`) reads each sequence's heads straight from the fused QKV
projection, with no gather, padding or scatter; on CUDA GPUs (bf16/fp16, sm80+) FlashAttention's
variable-length kernel, which PyTorch ships, does the same. `ops/backend.py` chooses once, at
start.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from soberana.ops.cpu import kernels as cpu_kernels

# A group's padded size may exceed its real tokens by this share (attention only).
_MAX_GROUP_PADDING = 0.15


class PackedSeqs:
    """Where each sequence of a packed batch lies: `seq_lens`, and `starts` [B + 1] (int64
    row offsets on `device`); `groups`, the padded length groups, built on first use (the
    PyTorch attention path's only)."""

    def __init__(self, seq_lens: list[int], device: torch.device) -> None:
        self.seq_lens = seq_lens
        self.device = device
        starts = [0]
        for n in seq_lens:
            starts.append(starts[-1] + n)
        self.starts = torch.tensor(starts, dtype=torch.int64, device=device)

    @functools.cached_property
    def groups(self) -> list[tuple]:
        return _group_index(self.seq_lens, self.device)

    @functools.cached_property
    def cu_seqlens(self) -> torch.Tensor:
        """`starts` as int32 (FlashAttention's varlen kernel), built on first use."""
        return self.starts.to(torch.int32)


def length_groups(seq_lens: list[int]) -> list[list[int]]:
    """Sequence indices in groups of similar length, longest first, padding each group to its
    longest member wastes at most ~15% of the group's attention work."""
    order = sorted(range(len(seq_lens)), key=lambda i: -seq_lens[i])
    groups: list[list[int]] = []
    real = 0
    for i in order:
        if groups:
            longest = seq_lens[groups[-1][0]]
            if longest * (len(groups[-1]) + 1) <= (1 + _MAX_GROUP_PADDING) * (real + seq_lens[i]):
                groups[-1].append(i)
                real += seq_lens[i]
                continue
        groups.append([i])
        real = seq_lens[i]
    return groups


def _group_index(seq_lens: list[int], device: torch.device) -> list[tuple]:
    """Per group (b, L, src, valid, dst, mask): `src` [b * L], the packed row of each padded
    position (a padding position reads the group's first row: any real row keeps the values
    finite, and the mask hides it); `valid` [n], the padded positions holding tokens, None when
    nothing is padded; `dst` [n], their packed rows; `mask` [b, 1, 1, L], keys that exist, None
    without padding. `index_select` / `index_copy_` on flat indices: advanced indexing with
    [b, L] index tensors and boolean masks took ~40% of a MiniLM forward on a 2-core Zen 4."""
    starts = [0]
    for n in seq_lens[:-1]:
        starts.append(starts[-1] + n)
    groups = []
    for group in length_groups(seq_lens):
        longest = seq_lens[group[0]]
        offsets = torch.arange(longest)
        lens = torch.tensor([seq_lens[i] for i in group])
        first = torch.tensor([starts[i] for i in group])
        rows = first[:, None] + offsets[None, :]  # [b, L]
        padded = bool((lens != longest).any())
        valid = offsets[None, :] < lens[:, None]
        src = torch.where(valid, rows, first[:1, None]).flatten()
        if padded:
            flat_valid = valid.flatten().nonzero().flatten()
            dst = src[flat_valid]
            mask = valid[:, None, None, :].to(device)
            flat_valid = flat_valid.to(device)
        else:
            flat_valid, dst, mask = None, src, None
        groups.append((len(group), longest, src.to(device), flat_valid, dst.to(device), mask))
    return groups


def torch_encoder_attention(qkv: torch.Tensor, seqs: PackedSeqs, num_heads: int,
                            scale: float) -> torch.Tensor:  # fmt: skip
    """Each sequence's bidirectional attention, from the fused projection qkv [T, 3 H D] (q, k,
    v heads in that order): [T, H D]."""
    t, width = qkv.shape
    head_dim = width // (3 * num_heads)
    attn = torch.empty(t, num_heads * head_dim, dtype=qkv.dtype, device=qkv.device)
    for b, length, src, valid, dst, mask in seqs.groups:
        g = qkv.index_select(0, src).view(b, length, 3, num_heads, head_dim)
        q, k, v = g.permute(2, 0, 3, 1, 4).unbind(0)  # [b, heads, L, head_dim] each
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        out = out.transpose(1, 2).reshape(b * length, num_heads * head_dim)
        if valid is not None:  # padded queries are dropped
            out = out.index_select(0, valid)
        attn.index_copy_(0, dst, out)
    return attn


def torch_add_layer_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                         bias: torch.Tensor, eps: float) -> torch.Tensor:  # fmt: skip
    """F.layer_norm(x + residual) (of x alone without a residual)."""
    if residual is not None:
        x = x + residual
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def native_encoder_attention(qkv: torch.Tensor, seqs: PackedSeqs, num_heads: int,
                             scale: float) -> torch.Tensor:  # fmt: skip
    """torch_encoder_attention on the native kernel (csrc/encoder_layers.c)."""
    return cpu_kernels.encoder_attention(qkv, seqs.starts, num_heads, scale)


def flash_varlen_encoder_attention(qkv: torch.Tensor, seqs: PackedSeqs, num_heads: int,
                                   scale: float) -> torch.Tensor:  # fmt: skip
    """torch_encoder_attention on FlashAttention-2's variable-length kernel (CUDA, bf16/fp16,
    sm80+): q, k, v are strided views of the packed projection, no gather, padding or mask.
    aten's op rather than `torch.nn.attention.varlen.varlen_attn`, whose signature changed
    between PyTorch 2.10 and 2.13; this op's positional arguments did not."""
    t, width = qkv.shape
    head_dim = width // (3 * num_heads)
    q, k, v = qkv.view(t, 3, num_heads, head_dim).unbind(1)  # [T, heads, head_dim] each
    longest = max(seqs.seq_lens)
    out = torch.ops.aten._flash_attention_forward(
        q, k, v, seqs.cu_seqlens, seqs.cu_seqlens, longest, longest, 0.0, False, False,
        scale=scale)[0]  # fmt: skip
    return out.reshape(t, num_heads * head_dim)
