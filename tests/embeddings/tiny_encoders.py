"""Tiny random encoders built with `transformers`, saved as Hugging Face directories with the
real all-MiniLM WordPiece tokenizer, for exactness tests against transformers and
sentence-transformers on the same weights."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import transformers

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def build(kind: str, out: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """`kind`: bert | xlmr (embedders) or bert-cross | xlmr-cross (one-label cross-encoders)."""
    torch.manual_seed(seed)
    common = dict(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=128, max_position_embeddings=128, type_vocab_size=2)
    if kind.startswith("bert"):
        cfg = transformers.BertConfig(**common)
        cls = (transformers.BertForSequenceClassification if kind.endswith("cross")
               else transformers.BertModel)
    else:
        # pad 0: the WordPiece tokenizer's [PAD]; positions then start at 1, as RoBERTa's do
        # past its padding index.
        cfg = transformers.XLMRobertaConfig(**common, pad_token_id=0, bos_token_id=101,
                                            eos_token_id=102)
        cls = (transformers.XLMRobertaForSequenceClassification if kind.endswith("cross")
               else transformers.XLMRobertaModel)
    if kind.endswith("cross"):
        cfg.num_labels = 1
    model = cls(cfg).eval()
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, out / name)
    return out
