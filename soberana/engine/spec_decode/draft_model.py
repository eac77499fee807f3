"""Draft-model proposer: a smaller causal LM (or the target's own first layers) drafts k
tokens greedily over its own paged KV cache.

The drafter keeps, per request, how many leading positions its cache holds. After a
verification the positions past the target's computed tokens may hold rejected drafts, so
the next proposal resumes from min(own, target's num_computed_tokens): rollback is a number.

On GPUs the drafter's single-token steps (every step of a proposal after the first, which
catches up on the tokens the drafter has not seen) replay CUDA graphs over its own pool.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import torch
from torch import nn

from soberana.engine.block_pool import BlockPool
from soberana.engine.cuda_graphs import DecodeGraphs
from soberana.engine.request import Request
from soberana.engine.spec_decode.proposer import Proposer
from soberana.models.transformer import CausalLM
from soberana.ops.attention import AttentionMetadata, GatherWorkspace


def first_layers(model: CausalLM, num_layers: int) -> CausalLM:
    """A view of `model` running only its first `num_layers` layers, then its final norm and
    head (LayerSkip-style self-speculation). Weights are shared, nothing is copied."""
    if not 1 <= num_layers < model.config.num_layers:
        raise ValueError(f"speculative_config.num_draft_layers must be in [1, "
                         f"{model.config.num_layers - 1}]; got {num_layers}")
    view = copy.copy(model)
    # copy.copy shares the module dicts: give the view its own before replacing `layers`.
    view._modules = dict(model._modules)
    view._parameters = dict(model._parameters)
    view._buffers = dict(model._buffers)
    view.layers = nn.ModuleList(list(model.layers)[:num_layers])
    view.config = dataclasses.replace(model.config, num_layers=num_layers)
    view.use_kernels(model.kernels)  # a native stack of its own layers (CPU)
    return view


class DraftModelProposer(Proposer):
    def __init__(self, model: CausalLM, k: int, num_tokens: int, block_size: int,
                 device: torch.device, dtype: torch.dtype, vocab_size: int) -> None:
        cfg = model.config
        self.vocab_size = vocab_size  # the target's: a draft id past it could not be verified
        self.model, self.k, self.bs, self.device = model, k, block_size, device
        num_blocks = -(-num_tokens // block_size)
        self.kv_cache = torch.zeros(cfg.num_layers, 2, num_blocks, block_size, cfg.num_kv_heads,
                                    cfg.head_dim, dtype=dtype, device=device)
        if hasattr(model, "share_kv_cache"):  # tensor parallel: each rank's pool, its heads
            model.share_kv_cache(self.kv_cache)
        self.pool = BlockPool(num_blocks, enable_caching=False)
        self.blocks: dict[tuple[str, int], list] = {}
        self.computed: dict[tuple[str, int], int] = {}
        self.workspace = GatherWorkspace() if device.type == "cpu" else None
        self.graphs: DecodeGraphs | None = None
        self.num_graph_steps = 0  # drafting steps served by a graph (tests, logs)

    def capture_graphs(self, max_num_seqs: int, max_blocks_per_seq: int) -> float:
        """GPU: capture the drafter's decode steps for up to `max_num_seqs` requests (the
        most that draft at once); returns the seconds it took."""
        self.graphs = DecodeGraphs(self.model, self.kv_cache, max_num_seqs, max_blocks_per_seq,
                                   self.device)
        return self.graphs.capture()

    def forget_except(self, live: set[tuple[str, int]]) -> None:
        for key in [k for k in self.blocks if k not in live]:
            self.pool.free(self.blocks.pop(key))
            self.computed.pop(key, None)

    def _reserve(self, key: tuple[str, int], num_tokens: int) -> bool:
        held = self.blocks.setdefault(key, [])
        need = -(-num_tokens // self.bs) - len(held)
        if need > self.pool.num_free_blocks:
            return False
        if need > 0:
            held.extend(self.pool.allocate(need))
        return True

    @torch.inference_mode()
    def propose(self, requests: list[Request], num_drafts: list[int]) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in requests]
        rows = []  # (index, request, start, tokens to feed, drafts wanted)
        for i, (r, k) in enumerate(zip(requests, num_drafts)):
            if k < 1:
                continue
            start = min(self.computed.get(r.key, 0), r.num_computed_tokens)
            if not self._reserve(r.key, r.num_tokens + k - 1):
                continue  # the draft pool is full: this request decodes without drafts
            rows.append((i, r, start, r.token_slice(start, r.num_tokens), k))
        if not rows:
            return out
        # Catch up on what the drafter has not seen; its last row gives the first draft.
        last = self._forward([(r.key, s, toks) for _, r, s, toks, _ in rows])
        for j, (i, r, _, _, _) in enumerate(rows):
            out[i].append(last[j])
            self.computed[r.key] = r.num_tokens
        for step in range(1, max(k for *_, k in rows)):
            live = [(i, r) for i, r, _, _, k in rows if k > step]
            last = self._forward([(r.key, self.computed[r.key], [out[i][-1]]) for i, r in live])
            for j, (i, r) in enumerate(live):
                out[i].append(last[j])
                self.computed[r.key] += 1
        return out

    def _forward(self, seqs: list[tuple[tuple[str, int], int, list[int]]]) -> list[int]:
        """One forward over (key, first position, token ids) sequences; argmax of each
        sequence's last row. Single-token sequences go first (the attention kernels'
        decode-first layout)."""
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][2]) != 1)
        seqs = [seqs[i] for i in order]
        q_lens = np.array([len(t) for _, _, t in seqs], dtype=np.int64)
        starts = np.array([s for _, s, _ in seqs], dtype=np.int64)
        cu = np.zeros(len(seqs) + 1, dtype=np.int64)
        np.cumsum(q_lens, out=cu[1:])
        total = int(cu[-1])
        positions = np.repeat(starts, q_lens) + (np.arange(total) - np.repeat(cu[:-1], q_lens))
        tables = [[b.block_id for b in self.blocks[key]] for key, _, _ in seqs]
        table_np = np.zeros((len(seqs), max(len(t) for t in tables)), dtype=np.int32)
        for i, t in enumerate(tables):
            table_np[i, :len(t)] = t
        req_of_token = np.repeat(np.arange(len(seqs)), q_lens)
        bs = self.bs
        slots = table_np[req_of_token, positions // bs].astype(np.int64) * bs + positions % bs
        seq_lens = starts + q_lens
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.from_numpy(slots).to(dev),
            query_start_loc=torch.from_numpy(cu.astype(np.int32)).to(dev),
            seq_lens=torch.from_numpy(seq_lens.astype(np.int32)).to(dev),
            block_table=torch.from_numpy(table_np).to(dev),
            num_decodes=int((q_lens == 1).sum()), query_lens_cpu=q_lens.tolist(),
            seq_lens_cpu=seq_lens.tolist(), workspace=self.workspace,
        )
        ids = torch.tensor([t for _, _, toks in seqs for t in toks], dtype=torch.long).to(dev)
        graphs = self.graphs
        if graphs is not None and total == len(seqs) <= graphs.max_batch:  # decodes only
            hidden = graphs.run(ids, torch.from_numpy(positions).to(dev), meta.slot_mapping,
                                meta.seq_lens, meta.block_table)
            self.num_graph_steps += 1
        else:
            hidden = self.model(ids, torch.from_numpy(positions).to(dev), self.kv_cache, meta)
        logits = self.model.compute_logits(hidden[torch.from_numpy(cu[1:] - 1).to(dev)],
                                           float32=False)
        picked = logits[:, :self.vocab_size].argmax(dim=-1).tolist()
        result = [0] * len(seqs)
        for j, i in enumerate(order):
            result[i] = picked[j]
        return result
