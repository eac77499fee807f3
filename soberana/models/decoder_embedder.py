"""Decoder embedders (Qwen3-Embedding, e5-mistral, gte-Qwen style): a causal LM's final-norm
hidden states, pooled at each sequence's last token by the pooling core.

The decoder runs the existing model code (models/transformer.py) over a packed batch, each
sequence a prefill from position 0 with its own blocks of a scratch KV cache: no pad token
is computed, so left or right padding, which a padded reference must handle, does not arise.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from soberana.models.encoder import PackedBatch
from soberana.models.loader import load_model
from soberana.models.transformer import CausalLM
from soberana.ops.attention import AttentionMetadata, GatherWorkspace
from soberana.ops.backend import Backend

_BLOCK = 16  # scratch-cache block size (tokens)


def is_decoder_embedder_dir(path: Path) -> bool:
    """A decoder checkpoint meant for embeddings: a headless architecture (`Qwen3Model`,
    `LlamaModel`, ...) or a sentence-transformers `modules.json` beside it (Qwen3-Embedding
    ships `Qwen3ForCausalLM` weights with a last-token Pooling module)."""
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    arch = (raw.get("architectures") or [""])[0]
    return arch.endswith("Model") or (path / "modules.json").is_file()


@dataclass
class DecoderShape:
    """What the pooling core reads of a model's shape (EncoderConfig's names)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    max_tokens: int
    num_labels: None = None  # no classification head: embeddings only


class DecoderEmbedder:
    """Final-norm hidden states [T, hidden] of packed sequences through a CausalLM."""

    position_offset = 0

    def __init__(self, model: CausalLM, max_tokens: int, device: torch.device) -> None:
        c = model.config
        self.model, self.device = model, device
        self.cfg = DecoderShape(c.vocab_size, c.hidden_size, c.num_layers, max_tokens)
        self.kv_cache: torch.Tensor | None = None  # grown to the largest batch, then kept
        self.workspace = GatherWorkspace() if device.type == "cpu" else None

    def _cache(self, num_blocks: int) -> torch.Tensor:
        if self.kv_cache is None or self.kv_cache.shape[2] < num_blocks:
            c = self.model.config
            dtype = self.model.embed_tokens.weight.dtype
            self.kv_cache = torch.zeros(c.num_layers, 2, num_blocks, _BLOCK, c.num_kv_heads,
                                        c.head_dim, dtype=dtype, device=self.device)
        return self.kv_cache

    def __call__(self, batch: PackedBatch) -> torch.Tensor:
        """Hidden states of every token, in the batch's order."""
        lens = np.array(batch.seq_lens, dtype=np.int64)
        # The attention kernels take single-token sequences (decodes) first.
        order = np.argsort(lens != 1, kind="stable")
        q_lens = lens[order]
        cu = np.zeros(len(lens) + 1, dtype=np.int64)
        np.cumsum(q_lens, out=cu[1:])
        blocks = -(-q_lens // _BLOCK)
        first_block = np.concatenate([[0], np.cumsum(blocks)[:-1]])
        table = first_block[:, None] + np.arange(blocks.max())[None, :]
        positions = np.arange(cu[-1]) - np.repeat(cu[:-1], q_lens)
        seq_of_token = np.repeat(np.arange(len(lens)), q_lens)
        slots = table[seq_of_token, positions // _BLOCK] * _BLOCK + positions % _BLOCK
        # Token t of the batch in kernel order comes from row src[t] of the packed input.
        starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
        src = np.repeat(starts[order], q_lens) + positions
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.from_numpy(slots).to(dev),
            query_start_loc=torch.from_numpy(cu.astype(np.int32)).to(dev),
            seq_lens=torch.from_numpy(q_lens.astype(np.int32)).to(dev),
            block_table=torch.from_numpy(table.astype(np.int32)).to(dev),
            num_decodes=int((q_lens == 1).sum()), query_lens_cpu=q_lens.tolist(),
            seq_lens_cpu=q_lens.tolist(), workspace=self.workspace,
        )
        src_t = torch.from_numpy(src).to(dev)
        hidden = self.model(batch.input_ids[src_t], torch.from_numpy(positions).to(dev),
                            self._cache(int(blocks.sum())), meta)
        out = torch.empty_like(hidden)
        out[src_t] = hidden  # back to the packed order the pooling reads
        return out


def load_decoder_embedder(path: Path, dtype: torch.dtype, device: torch.device,
                          max_tokens: int | None, backend: Backend) -> DecoderEmbedder:
    """The decoder at `path` as an embedder on `backend`'s ops; `max_tokens` caps its
    positions (None: the checkpoint's max_position_embeddings)."""
    raw = json.loads((path / "config.json").read_text())
    limit = max_tokens or raw.get("max_position_embeddings") or 8192
    model = load_model(path, dtype, device, limit, backend=backend).model
    return DecoderEmbedder(model, limit, device)
