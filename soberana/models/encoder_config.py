"""The shape of an encoder (BERT, RoBERTa / XLM-RoBERTa) from its config.json, without torch:
the engine-core process reads it before it imports torch (core_process.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

ENCODER_ARCHITECTURES = {
    "BertModel": ("bert", None),
    "BertForSequenceClassification": ("bert", "classify"),
    "RobertaModel": ("roberta", None),
    "RobertaForSequenceClassification": ("roberta", "classify"),
    "XLMRobertaModel": ("roberta", None),
    "XLMRobertaForSequenceClassification": ("roberta", "classify"),
}

@dataclass
class EncoderConfig:
    """The shape of an encoder, from its Hugging Face config.json."""

    family: str  # "bert" or "roberta" (positions offset past the padding index)
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    hidden_act: str
    pad_token_id: int
    num_labels: int | None  # a cross-encoder's classifier outputs; None for an embedder

    @property
    def max_tokens(self) -> int:
        """The longest sequence the position table covers (RoBERTa spends pad_id + 1 rows)."""
        if self.family == "roberta":
            return self.max_position_embeddings - self.pad_token_id - 1
        return self.max_position_embeddings

    @classmethod
    def from_dir(cls, path: Path) -> EncoderConfig:
        raw = json.loads((path / "config.json").read_text())
        arch = (raw.get("architectures") or ["BertModel"])[0]
        if arch not in ENCODER_ARCHITECTURES:
            raise ValueError(
                f"{path}: architecture {arch!r} is not an encoder Soberana serves "
                f"({', '.join(sorted(ENCODER_ARCHITECTURES))})"
            )
        family, head = ENCODER_ARCHITECTURES[arch]
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{path}: position_embedding_type "
                             f"{raw['position_embedding_type']!r} is not supported (absolute only)")
        num_labels = None
        if head == "classify":
            num_labels = len(raw.get("id2label") or {0: "LABEL_0"})
        return cls(
            family=family,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=raw["num_attention_heads"],
            intermediate_size=raw["intermediate_size"],
            max_position_embeddings=raw["max_position_embeddings"],
            type_vocab_size=raw.get("type_vocab_size", 2),
            layer_norm_eps=raw.get("layer_norm_eps", 1e-12),
            hidden_act=raw.get("hidden_act", "gelu"),
            pad_token_id=raw.get("pad_token_id", 0 if family == "bert" else 1),
            num_labels=num_labels,
        )


def is_encoder_dir(path: Path) -> bool:
    """Whether `path/config.json` names an encoder architecture."""
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return (raw.get("architectures") or [""])[0] in ENCODER_ARCHITECTURES
