"""How an embedder turns token states into one vector: read from the sentence-transformers
files beside the model (`modules.json`, `1_Pooling/config.json`, `sentence_bert_config.json`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

POOLING_MODES = ("mean", "cls", "last")


@dataclass
class PoolingConfig:
    mode: str = "mean"  # "mean" (over the sequence), "cls" (first token) or "last" (last token)
    normalize: bool = False  # L2-normalise the pooled vector
    max_seq_length: int | None = None  # sentence-transformers' own cap, below the model's

    @classmethod
    def from_dir(cls, path: Path, default_mode: str = "mean") -> PoolingConfig:
        """The pooling of a sentence-transformers directory; `default_mode` without one."""
        modules = _json(path / "modules.json") or []
        config = cls(mode=default_mode)
        for module in modules:
            kind = module.get("type", "")
            if kind.endswith("Pooling"):
                config.mode = _mode(_json(path / module.get("path", "") / "config.json") or {},
                                    path)
            elif kind.endswith("Normalize"):
                config.normalize = True
            elif kind.endswith(("Dense", "LayerNorm", "WordWeights", "CNN", "LSTM")):
                raise ValueError(f"{path}: sentence-transformers module {kind} is not supported")
        bert_config = _json(path / "sentence_bert_config.json") or {}
        config.max_seq_length = bert_config.get("max_seq_length")
        return config


def _mode(raw: dict, path: Path) -> str:
    if raw.get("pooling_mode_mean_tokens"):
        return "mean"
    if raw.get("pooling_mode_cls_token"):
        return "cls"
    if raw.get("pooling_mode_lasttoken"):
        return "last"
    modes = [k for k, v in raw.items() if k.startswith("pooling_mode") and v]
    raise ValueError(f"{path}: pooling {modes or 'none'} is not supported ({', '.join(POOLING_MODES)})")


def _json(path: Path) -> dict | list | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def pool(hidden: torch.Tensor, seq_lens: list[int], config: PoolingConfig) -> torch.Tensor:
    """One vector per sequence [B, hidden] from packed token states [T, hidden], in float32."""
    starts = torch.tensor([0, *seq_lens[:-1]], device=hidden.device).cumsum(0)
    lens = torch.tensor(seq_lens, device=hidden.device)
    if config.mode == "cls":
        pooled = hidden[starts].float()
    elif config.mode == "last":
        pooled = hidden[starts + lens - 1].float()
    else:
        seq_ids = torch.repeat_interleave(torch.arange(len(seq_lens), device=hidden.device), lens)
        sums = torch.zeros(len(seq_lens), hidden.shape[1], device=hidden.device)
        sums.index_add_(0, seq_ids, hidden.float())
        pooled = sums / lens[:, None]
    return F.normalize(pooled, dim=-1) if config.normalize else pooled


def cosine(a: list[float], b: list[float]) -> float:
    """Cosine similarity of two vectors (0 when either is zero)."""
    dot = sum(x * y for x, y in zip(a, b))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm else 0.0
