"""CUDA graphs of speculative decoding's verification steps.

A step in which every scheduled request is a decode or verifies its drafts (no prefill chunk)
has at most Q = k + 1 query tokens per request. It replays a graph captured for a bucket of B
requests of Q query rows each (B from `graph_batch_sizes`, up to the batch size where
speculation turns itself off). Request i owns rows [i*Q, (i+1)*Q): its q real tokens are the
last q rows and the Q - q rows before them are padding. The prefill attention kernel places a
request's query rows at the last positions of its context (row j at `seq_len - Q + j`), so
padding in front leaves the real rows exactly where the eager step puts them. Padding rows
write no KV (slot -1), attend to the real context before them (finite values) and are dropped;
requests past n in the bucket attend to Q slots of whatever blocks their stale table rows
name (read only). A plain decode (q = 1) in a step that verifies rides in the same graph.

The graphs hold the model's forward to the final norm; logits and verification stay outside,
as with the decode graphs (engine/cuda_graphs.py).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from soberana.engine.cuda_graphs import graph_batch_sizes
from soberana.models.transformer import CausalLM
from soberana.ops.attention import AttentionMetadata

log = logging.getLogger("soberana.engine")


@dataclass
class VerifyLayout:
    """Where a step's packed tokens go in a graph bucket (all host arrays)."""

    bucket: int  # B: the graph replayed
    rows: np.ndarray  # [num_tokens] int64: graph row of each packed token, in step order
    positions: np.ndarray  # [B * Q] int64: every row's position (padding: the kernel's)
    seq_lens: np.ndarray  # [B] int32: padding requests get Q


def verify_buckets(max_num_seqs: int, disable_by_batch_size: int) -> list[int]:
    """Request counts captured: speculation stops drafting above `disable_by_batch_size`
    running requests, so no larger verification step exists."""
    return graph_batch_sizes(min(max_num_seqs, disable_by_batch_size))


def plan_verify_layout(q_lens: list[int], seq_lens: list[int], query_len: int,
                       buckets: list[int]) -> VerifyLayout | None:
    """The bucket layout of a step of `q_lens` query tokens per request over `seq_lens`
    contexts, or None when the step does not fit a graph: a request with more than
    `query_len` tokens (a prefill), more requests than the largest bucket, or a context
    shorter than `query_len` (its first padding rows would precede position 0)."""
    n = len(q_lens)
    if n == 0 or n > buckets[-1] or max(q_lens) > query_len or min(seq_lens) < query_len:
        return None
    bucket = next(b for b in buckets if b >= n)
    q = np.asarray(q_lens, dtype=np.int64)
    ends = (np.arange(n, dtype=np.int64) + 1) * query_len
    first = ends - q  # each request's first real row
    cu = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(q, out=cu[1:])
    rows = np.repeat(first, q) + (np.arange(int(cu[-1])) - np.repeat(cu[:-1], q))
    lens = np.full(bucket, query_len, dtype=np.int32)
    lens[:n] = seq_lens
    positions = (np.repeat(lens.astype(np.int64), query_len) - query_len
                 + np.tile(np.arange(query_len), bucket))
    return VerifyLayout(bucket, rows, positions, lens)


class VerifyGraphs:
    """One graph per bucket of requests, Q = num_speculative_tokens + 1 query rows each.

    `use_graphs=False` replays by running the model eagerly on the same static buffers (the
    CPU tests of the layout); `pad_slot` is where padding rows write their KV: -1 (skipped)
    on GPUs, a scratch slot where the cache write cannot skip.
    """

    def __init__(self, model: CausalLM, kv_cache: torch.Tensor, num_speculative_tokens: int,
                 max_num_seqs: int, disable_by_batch_size: int, max_blocks_per_seq: int,
                 device: torch.device, use_graphs: bool = True, pad_slot: int = -1) -> None:
        self.model, self.kv_cache = model, kv_cache
        self.query_len = num_speculative_tokens + 1
        self.buckets = verify_buckets(max_num_seqs, disable_by_batch_size)
        self.use_graphs, self.pad_slot = use_graphs, pad_slot
        n, q = self.buckets[-1], self.query_len
        self.input_ids = torch.zeros(n * q, dtype=torch.long, device=device)
        self.positions = torch.arange(q, device=device).repeat(n)
        self.slot_mapping = torch.full((n * q,), pad_slot, dtype=torch.long, device=device)
        self.seq_lens = torch.full((n,), q, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(0, (n + 1) * q, q, dtype=torch.int32, device=device)
        self.block_table = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.hidden = torch.zeros(n * q, model.config.hidden_size, dtype=model_dtype(model),
                                  device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.num_replays = 0  # steps served by a graph (tests, logs)

    def _meta(self, bucket: int) -> AttentionMetadata:
        q, rows = self.query_len, bucket * self.query_len
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:rows],
            query_start_loc=self.query_start_loc[: bucket + 1],
            seq_lens=self.seq_lens[:bucket], block_table=self.block_table[:bucket],
            num_decodes=0, query_lens_cpu=[q] * bucket, seq_lens_cpu=[q] * bucket,
        )

    def _forward(self, bucket: int) -> None:
        rows = bucket * self.query_len
        self.hidden[:rows] = self.model(self.input_ids[:rows], self.positions[:rows],
                                        self.kv_cache, self._meta(bucket))

    @torch.inference_mode()
    def capture(self, pool=None) -> float:
        """Capture every bucket, largest first, into `pool` (shared with the decode graphs);
        returns the seconds it took."""
        t0 = time.perf_counter()
        for bucket in reversed(self.buckets):
            for _ in range(2):  # warm-up: Triton compiles and autotunes outside the capture
                self._forward(bucket)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._forward(bucket)
            pool = graph.pool()
            self.graphs[bucket] = graph
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        log.info("captured %d CUDA graphs (verification of %d tokens, batch %d..%d) in %.1fs",
                 len(self.graphs), self.query_len, self.buckets[0], self.buckets[-1], seconds)
        return seconds

    def plan(self, meta: AttentionMetadata) -> VerifyLayout | None:
        """The layout of a step, or None when it runs eagerly."""
        return plan_verify_layout(meta.query_lens_cpu, meta.seq_lens_cpu, self.query_len,
                                  self.buckets)

    def run(self, layout: VerifyLayout, input_ids: torch.Tensor, slot_mapping: torch.Tensor,
            block_table: torch.Tensor) -> torch.Tensor:
        """Replay `layout.bucket` for the step's packed tokens; returns hidden states
        [num_tokens, H] in the step's order."""
        dev = self.input_ids.device
        bucket, q = layout.bucket, self.query_len
        rows = torch.from_numpy(layout.rows).to(dev, non_blocking=True)
        self.input_ids.index_copy_(0, rows, input_ids)
        self.slot_mapping[: bucket * q].fill_(self.pad_slot)
        self.slot_mapping.index_copy_(0, rows, slot_mapping)
        self.positions[: bucket * q].copy_(torch.from_numpy(layout.positions), non_blocking=True)
        self.seq_lens[:bucket].copy_(torch.from_numpy(layout.seq_lens), non_blocking=True)
        n, width = block_table.shape
        self.block_table[:n, :width].copy_(block_table)
        if self.use_graphs:
            self.graphs[bucket].replay()
        else:
            self._forward(bucket)
        self.num_replays += 1
        return self.hidden.index_select(0, rows)


def model_dtype(model: CausalLM) -> torch.dtype:
    """The dtype of the model's hidden states (its embedding table's)."""
    return model.embed_tokens.weight.dtype
