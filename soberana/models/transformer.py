"""The decoder-only transformer (Llama, Mistral, Qwen2, Qwen3) over a paged KV cache.

One implementation: architecture differences (q/k/v bias, q/k RMSNorm, rope scaling, tied
embeddings) come from `ModelConfig`. Inputs are a packed token sequence, not a padded batch.
The layers start on the portable PyTorch ops and hold the implementations the compute backend
chose at start (`CausalLM.use_kernels`, soberana/ops/backend.py): nothing is chosen per call.
"""

from __future__ import annotations

import torch
from torch import nn

from soberana.models.config import ModelConfig, rope_inv_freq
from soberana.ops.attention import AttentionMetadata
from soberana.ops.backend import TORCH_KERNELS, Kernels
from soberana.ops.layers import RMSNorm, RotaryEmbedding, gemv_linear


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
        # Qwen3's per-head q/k norms, over [T, heads, head_dim] views of the projection
        qk, d, eps = cfg.qk_norm, cfg.head_dim, cfg.rms_norm_eps
        self.q_norm = RMSNorm(d, eps, per_head=True) if qk else None
        self.k_norm = RMSNorm(d, eps, per_head=True) if qk else None
        self.use_kernels(TORCH_KERNELS)

    def use_kernels(self, kernels: Kernels) -> None:
        """Hold the backend's attention functions (the norms get theirs from the model)."""
        self.write_kv, self.paged_attention = kernels.write_kv, kernels.paged_attention
        # rotary + cache write in one native call: layers without q/k norms only
        self.rope_and_cache = kernels.rope_and_cache if self.q_norm is None else None
        self.fused_decode = kernels.fused_decode_attention
        self.fused_decode_max_batch = kernels.fused_decode_max_batch

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
        t = qkv.shape[0]
        fused = self.fused_decode is not None and 0 < t == meta.num_decodes
        if fused and t <= self.fused_decode_max_batch:
            norms = (None, None) if self.q_norm is None else (self.q_norm.weight,
                                                              self.k_norm.weight)  # fmt: skip
            return self.fused_decode(
                qkv, positions, rotary.cos, rotary.sin, meta.slot_mapping, k_cache, v_cache,
                meta.seq_lens, meta.block_table, self.num_heads, self.scale, q_norm=norms[0],
                k_norm=norms[1], eps=self.eps,
            )  # fmt: skip
        if self.rope_and_cache is not None:
            # rotary embedding and the cache write in one native call; attention then reads
            # this step's keys back from the cache
            q = self.rope_and_cache(qkv, positions, rotary.cos, rotary.sin, k_cache, v_cache,
                                    meta.slot_mapping, self.num_heads)  # fmt: skip
            return self.paged_attention(q, None, None, k_cache, v_cache, meta,
                                        self.scale).reshape(t, -1)  # fmt: skip
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotary(positions, q, k)
        self.write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        return self.paged_attention(q, k, v, k_cache, v_cache, meta, self.scale).reshape(t, -1)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.tp = None  # tensor parallel: the TPGroup summing the row-parallel outputs
        self.use_kernels(TORCH_KERNELS)

    def use_kernels(self, kernels: Kernels) -> None:
        self.silu_and_mul = kernels.silu_and_mul
        # steps of up to gemv_max_rows tokens: norms and linears fused (Triton)
        self.gemv, self.gemv_max_rows = kernels.gemv, kernels.gemv_max_rows

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
        if self.gemv is not None and 0 < x.shape[0] <= self.gemv_max_rows:
            return self._forward_gemv(x, residual, positions, rotary, kv, meta)
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self._reduce(self.self_attn(h, positions, rotary, kv, meta))
        h, residual = self.post_attention_layernorm(h, residual)
        return self._reduce(self.down_proj(self.silu_and_mul(self.gate_up_proj(h)))), residual

    def _reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """Tensor parallel: sum the ranks' partial row-parallel outputs (soberana/distributed)."""
        return partial if self.tp is None else self.tp.all_reduce(partial)

    def _forward_gemv(self, x, residual, positions, rotary, kv, meta):
        """Steps of a few tokens on GPUs (decode batches up to 8, speculative verification,
        short prefill chunks, mixes of them): each norm and SiLU-and-mul runs inside the
        projection next to it (triton/gemv.py), which streams the weights once for all rows.
        The attention between is the step's own (`attend`: the fused decode kernel for
        decode-only steps, paged attention otherwise); five launches per layer at decode."""
        attn, gemv = self.self_attn, self.gemv
        qkv, residual = gemv_linear(gemv, x, attn.qkv_proj, self.input_layernorm, residual)
        h, _ = gemv_linear(gemv, attn.attend(qkv, positions, rotary, kv, meta), attn.o_proj)
        h = self._reduce(h)
        act, residual = gemv_linear(gemv, h, self.gate_up_proj, self.post_attention_layernorm,
                                    residual, gated=True)  # fmt: skip
        return self._reduce(gemv_linear(gemv, act, self.down_proj)[0]), residual


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
        self.kernels = TORCH_KERNELS
        self.stack = None  # the decoder layers in one native call (CPU), or None: modules

    def use_kernels(self, kernels: Kernels) -> None:
        """Run the compute backend's implementations from now on (ops/backend.py); called once
        the weights are loaded (and, on CPUs, packed), since the native stack reads them."""
        self.kernels = kernels
        for module in self.modules():
            if module is not self and hasattr(module, "use_kernels"):
                module.use_kernels(kernels)
        # tensor parallel: every layer's output is all-reduced, which the stack cannot do
        build = kernels.decoder_stack
        self.stack = build(self) if build is not None and self.tp is None else None

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        # embed_tokens None: tied to a quantized head, whose rows serve the lookup
        x = (self.embed_tokens(input_ids) if self.embed_tokens is not None
             else self.lm_head.embedding(input_ids))  # fmt: skip
        residual = None
        if self.stack is not None:  # all layers in one native call
            return self.stack(x, positions, kv_cache, meta)
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
