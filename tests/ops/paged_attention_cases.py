"""Random paged-attention steps and their float32 reference, shared by tests/ops and tests/gpu.

Each request's keys and values are drawn as contiguous tensors first, then scattered into a
random permutation of cache blocks, so the reference never reads the cache and a kernel that
follows `block_table` wrongly cannot agree with it. Every cache slot and block-table entry a
request does not own is NaN or points at NaN blocks: reading past a context poisons the output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from soberana.ops.attention import AttentionMetadata


@dataclass
class PagedStep:
    """One packed step: inputs in the engine's layout plus the contiguous K/V per request."""

    q: torch.Tensor  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor
    query_start_loc: torch.Tensor  # [B + 1] int32
    seq_lens: torch.Tensor  # [B] int32
    block_table: torch.Tensor  # [B, max_blocks] int32
    num_decodes: int
    max_query_len: int
    keys: list[torch.Tensor]  # request i: [seq_lens[i], num_kv_heads, head_dim]
    values: list[torch.Tensor]
    query_lens: list[int]
    scale: float
    # This step's own keys/values, packed like q, and their cache slots (-1: padding).
    new_keys: torch.Tensor
    new_values: torch.Tensor
    slot_mapping: torch.Tensor

    @property
    def meta(self) -> AttentionMetadata:
        """The engine's metadata object for this step."""
        return AttentionMetadata(
            slot_mapping=self.slot_mapping,
            query_start_loc=self.query_start_loc,
            seq_lens=self.seq_lens,
            block_table=self.block_table,
            num_decodes=self.num_decodes,
            query_lens_cpu=list(self.query_lens),
            seq_lens_cpu=self.seq_lens.tolist(),
        )


def make_step(
    context_lens: list[int],
    query_lens: list[int],
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: str | torch.device,
    generator: torch.Generator,
    spare_blocks: int = 3,
) -> PagedStep:
    """Build a step where request `i` has `context_lens[i]` keys, the last `query_lens[i]` new."""
    assert len(context_lens) == len(query_lens)
    # A zero-length context with one query is batch padding, whose output is defined as 0.
    assert all(
        0 <= q <= c or (c, q) == (0, 1) for q, c in zip(query_lens, context_lens, strict=True)
    )

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, device="cpu").to(dtype).to(device)

    blocks_per_req = [-(-c // block_size) for c in context_lens]
    num_blocks = sum(blocks_per_req) + spare_blocks
    perm = torch.randperm(num_blocks, generator=generator).tolist()
    used, spare = perm[: sum(blocks_per_req)], perm[sum(blocks_per_req) :]
    k_cache = torch.full(
        (num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype, device=device
    )
    v_cache = torch.full_like(k_cache, float("nan"))
    max_blocks = max(blocks_per_req + [1]) + 2
    # Padding entries point at NaN-filled spare blocks: valid addresses, poisoned contents.
    pad = spare[0] if spare else 0
    block_table = torch.full((len(context_lens), max_blocks), pad, dtype=torch.int32)
    keys, values, new_keys, new_values, new_slots = [], [], [], [], []
    next_block = 0
    for i, ctx in enumerate(context_lens):
        ids = used[next_block : next_block + blocks_per_req[i]]
        next_block += blocks_per_req[i]
        block_table[i, : len(ids)] = torch.tensor(ids, dtype=torch.int32)
        k, v = randn(ctx, num_kv_heads, head_dim), randn(ctx, num_kv_heads, head_dim)
        slots = torch.tensor(ids, dtype=torch.int64)[:, None] * block_size + torch.arange(
            block_size
        )
        slots = slots.flatten()[:ctx].to(device)
        k_cache.view(-1, num_kv_heads, head_dim)[slots] = k
        v_cache.view(-1, num_kv_heads, head_dim)[slots] = v
        keys.append(k)
        values.append(v)
        if ctx == 0:  # padding: a query row with nothing to write
            new_keys.append(torch.zeros(query_lens[i], num_kv_heads, head_dim, dtype=dtype))
            new_values.append(new_keys[-1])
            new_slots.append(torch.full((query_lens[i],), -1, dtype=torch.int64))
        else:
            new_keys.append(k[ctx - query_lens[i] :].cpu())
            new_values.append(v[ctx - query_lens[i] :].cpu())
            new_slots.append(slots[ctx - query_lens[i] :].cpu())
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    num_decodes = 0
    while num_decodes < len(query_lens) and query_lens[num_decodes] == 1:
        num_decodes += 1
    return PagedStep(
        q=randn(starts[-1], num_heads, head_dim),
        k_cache=k_cache,
        v_cache=v_cache,
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(context_lens, dtype=torch.int32, device=device),
        block_table=block_table.to(device),
        num_decodes=num_decodes,
        max_query_len=max(query_lens + [1]),
        keys=keys,
        values=values,
        query_lens=list(query_lens),
        scale=head_dim**-0.5,
        new_keys=torch.cat(new_keys).to(device),
        new_values=torch.cat(new_values).to(device),
        slot_mapping=torch.cat(new_slots).to(device),
    )


def reference_attention(step: PagedStep, query_chunk: int = 1024) -> torch.Tensor:
    """Float32 causal attention of each request's queries over its contiguous keys/values."""
    num_heads = step.q.shape[1]
    out = torch.zeros(step.q.shape, dtype=torch.float32, device=step.q.device)
    starts = step.query_start_loc.tolist()
    for i, (k, v) in enumerate(zip(step.keys, step.values, strict=True)):
        ctx, q_len = k.shape[0], step.query_lens[i]
        if q_len == 0 or ctx == 0:
            continue  # a zero-length sequence attends to nothing: its output is 0
        group = num_heads // k.shape[1]
        kf = k.float().repeat_interleave(group, dim=1).transpose(0, 1)  # [H, ctx, D]
        vf = v.float().repeat_interleave(group, dim=1).transpose(0, 1)
        key_pos = torch.arange(ctx, device=k.device)
        for c in range(0, q_len, query_chunk):
            rows = slice(starts[i] + c, starts[i] + min(q_len, c + query_chunk))
            qf = step.q[rows].float().transpose(0, 1)  # [H, n, D]
            q_pos = ctx - q_len + torch.arange(c, c + qf.shape[1], device=k.device)
            scores = (qf @ kf.transpose(1, 2)) * step.scale
            scores = scores.masked_fill(
                key_pos[None, None, :] > q_pos[None, :, None], float("-inf")
            )
            out[rows] = (torch.softmax(scores, dim=-1) @ vf).transpose(0, 1)
    return out


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; NaN anywhere in `out` gives NaN."""
    diff = (out.double() - ref.double()).norm()
    return (diff / ref.double().norm().clamp_min(1e-30)).item()


def with_fp8_cache(step: PagedStep) -> PagedStep:
    """`step` with its caches in float8_e4m3fn (--kv-cache-dtype fp8) and the reference's
    keys/values rounded as that cache stores them (attention.to_kv_cache_dtype)."""
    from soberana.ops.attention import from_kv_cache_dtype, to_kv_cache_dtype

    fp8 = torch.float8_e4m3fn
    step.k_cache = to_kv_cache_dtype(step.k_cache, fp8)
    step.v_cache = to_kv_cache_dtype(step.v_cache, fp8)
    step.keys = [from_kv_cache_dtype(to_kv_cache_dtype(k, fp8), k.dtype) for k in step.keys]
    step.values = [from_kv_cache_dtype(to_kv_cache_dtype(v, fp8), v.dtype) for v in step.values]
    return step
