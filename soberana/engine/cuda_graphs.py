"""CUDA graphs of the model's forward pass for decode-only steps.

One graph per bucketed batch size, captured at start (largest first, sharing one memory
pool). A step of `n` decodes replays the smallest bucket >= n; the padding rows write to
slot -1 (skipped) and attend to one zeroed slot, and their outputs are ignored. The
attention kernels size their launch from the static block-table width, so one capture
serves every context length up to max_model_len.
"""

from __future__ import annotations

import logging
import time

import torch

from soberana.models.transformer import CausalLM
from soberana.ops.attention import AttentionMetadata

log = logging.getLogger("soberana.engine")


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """vLLM-style buckets: 1, 2, 4, 8, then every 16 up to max_num_seqs (capped at 512)."""
    top = min(max_num_seqs, 512)
    sizes = [s for s in (1, 2, 4, 8) if s <= top] + list(range(16, top + 1, 16))
    if sizes[-1] != top:
        sizes.append(top)
    return sizes


class DecodeGraphs:
    def __init__(
        self,
        model: CausalLM,
        kv_cache: torch.Tensor,
        max_num_seqs: int,
        max_blocks_per_seq: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.sizes = graph_batch_sizes(max_num_seqs)
        n = self.sizes[-1]
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.long, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.block_table = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=device)
        # The model's dtype, not the cache's: an FP8 cache holds bf16 models' keys and values.
        self.hidden = torch.zeros(n, model.config.hidden_size,
                                  dtype=model.embed_tokens.weight.dtype, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = None  # the graphs' memory pool, shared with the verification graphs

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:bs], query_start_loc=self.query_start_loc[: bs + 1],
            seq_lens=self.seq_lens[:bs], block_table=self.block_table[:bs], num_decodes=bs,
            query_lens_cpu=[1] * bs, seq_lens_cpu=[1] * bs,
        )

    @torch.inference_mode()
    def capture(self) -> float:
        """Capture every bucket; returns the seconds it took."""
        t0 = time.perf_counter()
        pool = None
        for bs in reversed(self.sizes):
            meta = self._meta(bs)
            args = (self.input_ids[:bs], self.positions[:bs], self.kv_cache, meta)
            for _ in range(2):  # warm-up: Triton compiles and autotunes outside the capture
                self.hidden[:bs] = self.model(*args)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.hidden[:bs] = self.model(*args)
            pool = graph.pool()
            self.graphs[bs] = graph
        self.pool = pool
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        log.info("captured %d CUDA graphs (decode batch %d..%d) in %.1fs", len(self.graphs),
                 self.sizes[0], self.sizes[-1], seconds)
        return seconds

    def run(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        slot_mapping: torch.Tensor,
        seq_lens: torch.Tensor,
        block_table: torch.Tensor,
    ) -> torch.Tensor:
        """Replay the bucket that fits `n = len(input_ids)` decodes; returns hidden [n, H]."""
        n = input_ids.shape[0]
        bs = next(s for s in self.sizes if s >= n)
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(slot_mapping)
        self.slot_mapping[n:bs].fill_(-1)
        self.seq_lens[:n].copy_(seq_lens)
        self.seq_lens[n:bs].fill_(1)
        width = block_table.shape[1]
        self.block_table[:n, :width].copy_(block_table)
        self.graphs[bs].replay()
        return self.hidden[:n]
