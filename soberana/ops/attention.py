"""Attention over the paged KV cache: metadata and the portable PyTorch path.

Layout and field meanings are fixed in docs/engine-core.md. The PyTorch path serves CPUs
(and any device without Triton); the Triton path lives in `triton/attention.py`, the native
CPU kernel in `cpu/kernels.py`; `backend.py` chooses one at start.
"""

from __future__ import annotations

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
    # CPU path: reusable buffer for gathering decode KV, so each layer does not fault in
    # fresh pages for it (see GatherWorkspace).
    workspace: GatherWorkspace | None = None
    # CPU path: the decode groups, planned by the step's first layer (see decode_groups),
    # under the cache geometry they were planned for.
    cpu_decode_groups: tuple[tuple[int, ...], list[DecodeGroup]] | None = None


# Decode batches up to this size run the fused decode kernel (Triton backend). Its gain is the
# launches it saves, which matter at small batches; at 256 sequences of 512 tokens an H200 ran
# it ~4% slower than the separate kernels (benchmarks/gpu/decode_kernels.py).
FUSED_DECODE_MAX_BATCH = 64


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store this step's keys/values [T, Hkv, D] into their cache slots."""
    num_kv_heads, head_dim = k_cache.shape[-2:]
    if k_cache.dtype != key.dtype:  # an FP8 cache (--kv-cache-dtype fp8)
        key, value = to_kv_cache_dtype(key, k_cache.dtype), to_kv_cache_dtype(value, k_cache.dtype)
        # float8 has no index_copy_ on CPUs: copy its bytes
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
        key, value = key.view(torch.uint8), value.view(torch.uint8)
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, key)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, value)


# FP8 KV cache: one per-tensor scale of 1.0 for keys and values (vLLM's default when the
# checkpoint brings no calibrated k/v scales); values past e4m3's range saturate at +-448
# instead of becoming NaN.
KV_FP8_SCALE = 1.0


def to_kv_cache_dtype(x: torch.Tensor, cache_dtype: torch.dtype) -> torch.Tensor:
    """`x` as the cache stores it: float8_e4m3fn scaled by 1 / KV_FP8_SCALE, saturated."""
    return (x.float() / KV_FP8_SCALE).clamp_(-448.0, 448.0).to(cache_dtype)


def from_kv_cache_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cached keys or values back in the model dtype."""
    return x.to(dtype) if KV_FP8_SCALE == 1.0 else (x.float() * KV_FP8_SCALE).to(dtype)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor | None,
    v: torch.Tensor | None,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Causal attention of q [T, Hq, D] over cached + new keys; returns [T, Hq, D].

    `k`, `v` are this step's keys/values, already written to the cache (None: the PyTorch
    path reads them back from it).
    """
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    nd = meta.num_decodes
    if nd:
        _decode_attention(q[:nd], k_cache, v_cache, meta, scale, out[:nd])
    start = nd
    for i in range(nd, len(meta.query_lens_cpu)):
        q_len, seq_len = meta.query_lens_cpu[i], meta.seq_lens_cpu[i]
        end = start + q_len
        if seq_len == q_len and k is not None and v is not None:
            # No cached prefix: attend only to the new keys, no gather needed. Over an FP8
            # cache they are attended as stored (rounded), as every later step and the Triton
            # kernels read them, so a prompt gives the same logits whether its prefix was
            # computed now or found in the cache.
            ki, vi = k[start:end], v[start:end]
            if k_cache.dtype != ki.dtype:
                ki = from_kv_cache_dtype(to_kv_cache_dtype(ki, k_cache.dtype), q.dtype)
                vi = from_kv_cache_dtype(to_kv_cache_dtype(vi, k_cache.dtype), q.dtype)
        else:
            ki, vi = _gather_context(k_cache, v_cache, meta.block_table[i], seq_len)
            if ki.dtype != q.dtype:
                ki, vi = from_kv_cache_dtype(ki, q.dtype), from_kv_cache_dtype(vi, q.dtype)
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


# Decode attention works a few requests at a time: whole blocks are gathered (long copies,
# the fast way to read a scattered pool), then transposed per head while still in cache for
# the matmuls (measured ~30% faster than gathering 128-byte head rows straight from the
# pool, and 20-30% faster than doing all requests at once, on a CPU with 1 MB of L2).
# Bytes of gathered keys + values per chunk:
_CHUNK_BYTES = 4 << 20


@dataclass
class DecodeGroup:
    """Decodes of similar context length, attended to as one padded batch of `length` keys."""

    requests: slice | torch.Tensor  # rows of the decode batch: a range, or int64 indices
    blocks: torch.Tensor  # [n * ceil(length / block_size)] int64 cache blocks, request-major
    # Shorter requests only: rows of the gathered blocks ([n * blocks * block_size, Hkv * D])
    # past their context, and a [n, 1, 1, length] float32 score bias, -inf there, else 0.
    padding_rows: torch.Tensor | None
    bias: torch.Tensor | None
    num_seqs: int
    length: int


def decode_groups(meta: AttentionMetadata, k_cache: torch.Tensor) -> list[DecodeGroup]:
    """The step's decode groups: planned by the first layer, reused by the others."""
    key = (*k_cache.shape[1:], k_cache.element_size())
    if meta.cpu_decode_groups is None or meta.cpu_decode_groups[0] != key:
        meta.cpu_decode_groups = (key, _plan_decode_groups(meta, *key))
    return meta.cpu_decode_groups[1]


def _plan_decode_groups(
    meta: AttentionMetadata, block_size: int, num_kv_heads: int, head_dim: int, itemsize: int
) -> list[DecodeGroup]:
    # Longest first (stable, so equal lengths keep batch order and form ranges); a group ends
    # where padding to its longest would exceed a quarter of that length and 64 tokens, so
    # ragged batches waste little work without paying one set of ops per request.
    lens = meta.seq_lens_cpu[: meta.num_decodes]
    order = sorted(range(len(lens)), key=lambda i: -lens[i])
    groups, first = [], 0
    for j in range(1, len(order) + 1):
        longest = lens[order[first]]
        if j < len(order) and longest - lens[order[j]] <= max(64, longest // 4):
            continue
        per_seq = 2 * num_kv_heads * longest * head_dim * itemsize
        step = max(1, _CHUNK_BYTES // per_seq)
        for c in range(first, j, step):
            groups.append(_decode_group(meta, order[c : min(j, c + step)], block_size))
        first = j
    return groups


def _decode_group(meta: AttentionMetadata, members: list[int], block_size: int) -> DecodeGroup:
    device = meta.block_table.device
    length = meta.seq_lens_cpu[members[0]]
    if members == list(range(members[0], members[-1] + 1)):
        requests: slice | torch.Tensor = slice(members[0], members[-1] + 1)
    else:
        requests = torch.tensor(members, dtype=torch.long, device=device)
    num_blocks = -(-length // block_size)
    blocks = meta.block_table[requests, :num_blocks].long()
    rows = bias = None
    if any(meta.seq_lens_cpu[i] != length for i in members):
        seq_lens = meta.seq_lens[requests].long()[:, None]
        # Table entries past a request's own blocks may hold anything: read its first block.
        own = torch.arange(num_blocks, device=device)[None, :] * block_size < seq_lens
        blocks = torch.where(own, blocks, blocks[:, :1])
        past = torch.arange(length, device=device)[None, :] >= seq_lens  # [n, length]
        rows = torch.nonzero(past)
        rows = rows[:, 0] * (num_blocks * block_size) + rows[:, 1]
        bias = torch.zeros(past.shape, device=device).masked_fill_(past, float("-inf"))
        bias = bias[:, None, None, :]
    return DecodeGroup(requests, blocks.reshape(-1), rows, bias, len(members), length)


def _decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    out: torch.Tensor,
) -> None:
    # One query per request. The query heads sharing a KV head form one [G, D] matrix, so
    # each key and value is read once per group of heads (GQA without repeating K/V).
    group = q.shape[1] // k_cache.shape[2]
    for g in decode_groups(meta, k_cache):
        k, v = _gather_group(g, k_cache, v_cache, meta.workspace)  # [n, Hkv, L, D] each
        if k.dtype != q.dtype:
            k, v = from_kv_cache_dtype(k, q.dtype), from_kv_cache_dtype(v, q.dtype)
        in_range = isinstance(g.requests, slice)
        qg = q[g.requests] if in_range else q.index_select(0, g.requests)
        dst = out[g.requests] if in_range else torch.empty_like(qg)
        if q.dtype == torch.float32:
            # float32: PyTorch's fused kernel is the faster one (measured ~10%); in half
            # precision its one-query case is 2x slower than the matmuls.
            o = F.scaled_dot_product_attention(
                qg.unsqueeze(2), k, v, attn_mask=g.bias, scale=scale, enable_gqa=group > 1
            )
            dst.copy_(o.squeeze(2))
        else:
            _matmul_attention(qg, k, v, g.bias, scale, dst)
        if not in_range:
            out.index_copy_(0, g.requests, dst)


def _matmul_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
    scale: float, out: torch.Tensor,
) -> None:
    # q, out [n, Hq, D]; k, v [n, Hkv, L, D]. Softmax in float32, matmuls in the model dtype
    # (half-precision ones are fast on CPUs). Keys times queries, [L, D] @ [D, G], runs ~20%
    # faster than [G, D] @ [D, L] for G = 1.
    n, num_kv_heads, length, head_dim = k.shape
    group = q.shape[1] // num_kv_heads
    k, v = k.flatten(0, 1), v.flatten(0, 1)
    scores = torch.bmm(k, q.reshape(-1, group, head_dim).transpose(1, 2))
    scores = scores.transpose(1, 2).float().mul_(scale)
    if bias is not None:
        scores.view(n, num_kv_heads, group, length).add_(bias)
    probs = scores.softmax(-1).to(q.dtype)
    torch.bmm(probs, v, out=out.view(-1, group, head_dim))


def _gather_group(
    g: DecodeGroup, k_cache: torch.Tensor, v_cache: torch.Tensor,
    workspace: GatherWorkspace | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    # Whole blocks first (long copies), then per head into [n, Hkv, L, D] while in cache.
    block_size, num_kv_heads, head_dim = k_cache.shape[1:]
    gathered = g.blocks.numel() * k_cache[0].numel()
    per_part = g.num_seqs * num_kv_heads * g.length * head_dim
    if workspace is not None:
        buf = workspace.take(2 * gathered + 2 * per_part, k_cache)
    else:
        buf = torch.empty(2 * gathered + 2 * per_part, dtype=k_cache.dtype, device=k_cache.device)
    blocks = buf[: 2 * gathered].view(2, -1, block_size, num_kv_heads, head_dim)
    torch.index_select(k_cache, 0, g.blocks, out=blocks[0])
    torch.index_select(v_cache, 0, g.blocks, out=blocks[1])
    if g.padding_rows is not None:
        # What lies past a context may be stale or NaN, and 0 * NaN is NaN: clear it, so
        # the -inf bias alone masks it (cheaper than masked_fill on broadcast shapes).
        rows = blocks.view(2, -1, num_kv_heads * head_dim)
        if rows.dtype.itemsize == 1:  # float8 has no index_fill_ on CPUs: fill its bytes
            rows = rows.view(torch.uint8)
        rows.index_fill_(1, g.padding_rows, 0)
    kv = buf[2 * gathered :].view(2, g.num_seqs, num_kv_heads, g.length, head_dim)
    by_token = blocks.view(2, g.num_seqs, -1, num_kv_heads, head_dim)[:, :, : g.length]
    kv.copy_(by_token.transpose(2, 3))
    return kv[0], kv[1]
