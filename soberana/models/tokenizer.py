"""Tokenizer loading: a Hugging Face fast tokenizer with the model's chat template."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def load_tokenizer(path: Path | str):
    """Load the tokenizer saved beside the model (tokenizer.json / tokenizer_config.json), or
    built from a GGUF file's metadata."""
    from transformers import AutoTokenizer

    if Path(path).is_file():
        from soberana.models.gguf import gguf_tokenizer

        return gguf_tokenizer(path)

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # transformers raises many types for a missing/broken tokenizer
        raise ValueError(f"cannot load a tokenizer from {path}: {exc}") from exc


def eos_token_ids(tokenizer, model_eos: list[int]) -> list[int]:
    """The model's EOS ids (generation_config / config), else the tokenizer's."""
    if model_eos:
        return list(model_eos)
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
