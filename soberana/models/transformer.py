"""The decoder-only transformer (Llama, Mistral, Qwen2, Qwen3) over a paged KV cache.

One implementation: architecture differences (q/k/v bias, q/k RMSNorm, rope scaling, tied
embeddings) come from `ModelConfig`. Inputs are a packed token sequence, not a padded batch.
"""

from __future__ import annotations

import torch
from torch import nn

from soberana.models.config import ModelConfig, rope_inv_freq
from soberana.ops import cpu_forward, cpu_kernels
from soberana.ops.attention import (
    AttentionMetadata,
    fused_decode_attention,
    fuses_decode,
    paged_attention,
    write_kv,
)
from soberana.ops.layers import (
    RMSNorm,
    RotaryEmbedding,
    gemv_linear,
    silu_and_mul,
    uses_gemv,
)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.q_size, self.kv_size = cfg.q_size, cfg.kv_size
        self.scale = cfg.head_dim**-0.5
        self.eps = cfg.rms_norm_eps
        # q, k and v share one matmul: [q | k | v] along the output dimension.
        self.qkv_proj = nn.Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.q_size, cfg.hidden_size, bias=cfg.o_bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        rotary: RotaryEmbedding,
        kv: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        return self.o_proj(self.attend(self.qkv_proj(x), positions, rotary, kv, meta))

    def attend(
        self,
        qkv: torch.Tensor,
        positions: torch.Tensor,
        rotary: RotaryEmbedding,
        kv: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Attention output [T, q_size] from the fused projection; writes this step's K/V."""
        k_cache, v_cache = kv[0], kv[1]
        if fuses_decode(qkv, meta):
            norms = (None, None) if self.q_norm is None else (self.q_norm.weight, self.k_norm.weight)
            return fused_decode_attention(qkv, positions, rotary.cos, rotary.sin, k_cache,
                                          v_cache, meta, self.num_heads, self.scale, *norms,
                                          self.eps)  # fmt: skip
        t = qkv.shape[0]
        if qkv.device.type == "cpu" and self.q_norm is None:
            # rotary embedding and the cache write in one native call; attention then reads
            # this step's keys back from the cache
            q = cpu_kernels.rope_and_cache(qkv, positions, rotary.cos, rotary.sin, k_cache,
                                           v_cache, meta.slot_mapping, self.num_heads)  # fmt: skip
            if q is not None:
                out = paged_attention(q, None, None, k_cache, v_cache, meta, self.scale)
                return out.reshape(t, -1)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotary(positions, q, k)
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        return paged_attention(q, k, v, k_cache, v_cache, meta, self.scale).reshape(t, -1)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.tp = None  # tensor parallel: the TPGroup summing the row-parallel outputs

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        positions: torch.Tensor,
        rotary: RotaryEmbedding,
        kv: torch.Tensor,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's output, the residual stream before adding it).

        The residual add is deferred into the next norm, which fuses add + RMSNorm on GPUs.
        """
        if uses_gemv(x):
            return self._forward_gemv(x, residual, positions, rotary, kv, meta)
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self._reduce(self.self_attn(h, positions, rotary, kv, meta))
        h, residual = self.post_attention_layernorm(h, residual)
        return self._reduce(self.down_proj(silu_and_mul(self.gate_up_proj(h)))), residual

    def _reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """Tensor parallel: sum the ranks' partial row-parallel outputs (soberana/distributed)."""
        return partial if self.tp is None else self.tp.all_reduce(partial)

    def _forward_gemv(self, x, residual, positions, rotary, kv, meta):
        """Batch-1 decode on GPUs: each norm and SiLU-and-mul runs inside the projection next
        to it (triton_gemv.py), five launches per layer with the fused decode attention."""
        attn = self.self_attn
        qkv, residual = gemv_linear(x, attn.qkv_proj, self.input_layernorm, residual)
        h, _ = gemv_linear(attn.attend(qkv, positions, rotary, kv, meta), attn.o_proj)
        h = self._reduce(h)
        act, residual = gemv_linear(h, self.gate_up_proj, self.post_attention_layernorm,
                                    residual, gated=True)  # fmt: skip
        return self._reduce(gemv_linear(act, self.down_proj)[0]), residual


class CausalLM(nn.Module):
    """Token ids in, hidden states out; `compute_logits` maps chosen rows to the vocabulary."""

    def __init__(self, cfg: ModelConfig, max_positions: int) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(
            cfg.hidden_size, cfg.vocab_size, bias=False
        )
        self.rotary = RotaryEmbedding(rope_inv_freq(cfg.rope, cfg.head_dim), max_positions)
        self.tp = None  # tensor parallel: the TPGroup gathering vocabulary-sharded logits

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        if x.device.type == "cpu" and self.tp is None:  # all layers in one native call
            hidden = cpu_forward.forward(self, x, positions, kv_cache, meta)
            if hidden is not None:
                return hidden
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, positions, self.rotary, kv_cache[i], meta)
        return self.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor, float32: bool = True) -> torch.Tensor:
        """Logits [N, vocab] of the given hidden rows: float32, or with `float32=False` the
        output head's dtype (the sampler converts only where it needs to)."""
        if self.lm_head is None:  # tied embeddings
            logits = torch.nn.functional.linear(hidden, self.embed_tokens.weight)
        else:
            logits = self.lm_head(hidden)
        if self.tp is not None:  # each rank holds a slice of the vocabulary
            logits = self.tp.gather_vocab(logits, self.config.vocab_size)
        return logits.float() if float32 else logits
