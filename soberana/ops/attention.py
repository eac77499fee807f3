"""Attention over the paged KV cache: metadata and the portable PyTorch path.

Layout and field meanings are fixed in docs/engine-core.md. The PyTorch path serves CPUs
(and any device without Triton); the Triton path lives in `triton_attention.py`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    """Per-step description of a packed batch (vLLM's names)."""

    slot_mapping: torch.Tensor  # [num_tokens] int64
    query_start_loc: torch.Tensor  # [B + 1] int32
    seq_lens: torch.Tensor  # [B] int32
    block_table: torch.Tensor  # [B, max_blocks] int32
    num_decodes: int
    # Host copies, so the PyTorch path never syncs with the device to read lengths.
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    # CPU path: reusable buffer for gathering decode KV, so each step does not fault in
    # fresh pages for tens of MB (see GatherWorkspace).
    workspace: GatherWorkspace | None = None

    @property
    def num_decode_tokens(self) -> int:
        return self.num_decodes


@functools.cache
def _triton_ops():
    """The Triton kernels, or None where Triton is missing (CPU builds)."""
    try:
        from soberana.ops import triton_attention
    except ImportError:
        return None
    return triton_attention


def uses_triton(device: torch.device) -> bool:
    return device.type == "cuda" and _triton_ops() is not None


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store this step's keys/values [T, Hkv, D] into their cache slots (-1: skip, GPU only)."""
    if uses_triton(key.device):
        _triton_ops().reshape_and_cache(key, value, k_cache, v_cache, slot_mapping)
        return
    num_kv_heads, head_dim = k_cache.shape[-2:]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, key)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, value)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Causal attention of q [T, Hq, D] over cached + new keys; returns [T, Hq, D].

    `k`, `v` are this step's keys/values, already written to the cache.
    """
    if uses_triton(q.device):
        return _triton_ops().triton_paged_attention(q, k_cache, v_cache, meta, scale)
    out = torch.empty_like(q)
    nd = meta.num_decodes
    if nd:
        out[:nd] = _decode_attention(q[:nd], k_cache, v_cache, meta, scale)
    start = nd
    for i in range(nd, len(meta.query_lens_cpu)):
        q_len, seq_len = meta.query_lens_cpu[i], meta.seq_lens_cpu[i]
        end = start + q_len
        if seq_len == q_len:
            # No cached prefix: attend only to the new keys, no gather needed.
            ki, vi = k[start:end], v[start:end]
        else:
            ki, vi = _gather_context(k_cache, v_cache, meta.block_table[i], seq_len)
        out[start:end] = _prefill_attention(q[start:end], ki, vi, seq_len - q_len, scale)
        start = end
    return out


def _gather_context(
    k_cache: torch.Tensor, v_cache: torch.Tensor, blocks: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    block_size = k_cache.shape[1]
    n = (seq_len + block_size - 1) // block_size
    ids = blocks[:n]
    shape = (-1, *k_cache.shape[2:])
    return k_cache[ids].reshape(shape)[:seq_len], v_cache[ids].reshape(shape)[:seq_len]


def _prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset: int, scale: float
) -> torch.Tensor:
    # q: [Lq, Hq, D]; k, v: [Lk, Hkv, D] with Lk = offset + Lq. Batched 4-D inputs: with 3-D
    # ones PyTorch's CPU dispatch falls back to its math kernel (measured 10-15x slower).
    qh, kh, vh = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    gqa = qh.shape[1] != kh.shape[1]
    if offset == 0:
        o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        lq, lk = q.shape[0], k.shape[0]
        pos_q = torch.arange(offset, offset + lq, device=q.device)
        mask = torch.arange(lk, device=q.device)[None, :] <= pos_q[:, None]
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return o[0].transpose(0, 1)


class GatherWorkspace:
    """A flat buffer that grows to the largest decode gather seen and is then reused."""

    def __init__(self) -> None:
        self.buffer = torch.empty(0)

    def take(self, numel: int, like: torch.Tensor) -> torch.Tensor:
        if self.buffer.numel() < numel or self.buffer.dtype != like.dtype:
            self.buffer = torch.empty(int(numel * 1.25), dtype=like.dtype, device=like.device)
        return self.buffer[:numel]


def _gather_blocks(
    cache: torch.Tensor, ids: torch.Tensor, workspace: GatherWorkspace | None, part: int
) -> torch.Tensor:
    # part 0 / 1: keys and values use disjoint halves of one workspace.
    if workspace is None:
        return cache.index_select(0, ids)
    block_numel = cache[0].numel()
    n = ids.numel() * block_numel
    flat = workspace.take(2 * n, cache)[part * n:(part + 1) * n]
    out = flat.view(ids.numel(), *cache.shape[1:])
    return torch.index_select(cache, 0, ids, out=out)


def _decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    # One query per request: gather each request's blocks into a padded [B, L, Hkv, D] batch.
    nd = q.shape[0]
    block_size = k_cache.shape[1]
    seq_lens = meta.seq_lens_cpu[:nd]
    max_len = max(seq_lens)
    nblocks = (max_len + block_size - 1) // block_size
    ids = meta.block_table[:nd, :nblocks].reshape(-1)
    shape = (nd, nblocks * block_size, *k_cache.shape[2:])
    k = _gather_blocks(k_cache, ids, meta.workspace, 0).view(shape)
    v = _gather_blocks(v_cache, ids, meta.workspace, 1).view(shape)
    kh = k[:, :max_len].transpose(1, 2)  # [B, Hkv, L, D]
    vh = v[:, :max_len].transpose(1, 2)
    lens = meta.seq_lens[:nd].to(torch.long)
    mask = torch.arange(max_len, device=q.device)[None, :] < lens[:, None]  # [B, L]
    if q.dtype != torch.float32:
        return _decode_attention_matmul(q, kh, vh, mask, scale)
    qh = q.unsqueeze(2)  # [B, Hq, 1, D]
    gqa = qh.shape[1] != kh.shape[1]
    o = F.scaled_dot_product_attention(
        qh, kh, vh, attn_mask=mask[:, None, None, :], scale=scale, enable_gqa=gqa
    )
    return o.squeeze(2)


def _decode_attention_matmul(
    q: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    # bf16/fp16 on CPU: PyTorch's flash kernel is slow for one query (measured 2x), while
    # half-precision matmuls are fast; softmax stays float32. The query heads sharing a KV
    # head form one [G, D] matrix, so each K/V is read once per group.
    b, hq, d = q.shape
    hkv = kh.shape[1]
    qg = q.view(b, hkv, hq // hkv, d)
    scores = torch.matmul(qg, kh.transpose(-1, -2)).float() * scale  # [B, Hkv, G, L]
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf")).softmax(-1)
    return torch.matmul(scores.to(q.dtype), vh).reshape(b, hq, d)
