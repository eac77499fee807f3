"""Vocabulary-parallel embedding (the sharded linears are plain nn.Linear of shard shape;
the all-reduces after o_proj and down_proj sit in DecoderLayer, the logits gather in
CausalLM.compute_logits)."""

from __future__ import annotations

import torch
from torch import nn

from soberana.distributed.group import TPGroup


class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + V/tp) of the embedding; ids outside them give zeros, and an
    all-reduce sums the ranks' rows into every token's embedding."""

    def __init__(self, rows: int, hidden: int, start: int, group: TPGroup) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, hidden))
        self.start, self.rows, self.group = start, rows, group

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.rows)
        out = nn.functional.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0)
        return self.group.all_reduce(out)
