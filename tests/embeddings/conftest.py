"""Fixtures: the real all-MiniLM-L6-v2 and tiny random encoders on its tokenizer."""

from __future__ import annotations

import pytest

from tests.embeddings import tiny_encoders
from tests.real_models import real_model_dir


@pytest.fixture(scope="session")
def minilm():
    return real_model_dir("minilm")


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory, minilm):
    """A factory: tiny_encoder("bert" | "xlmr" | "bert-cross" | "xlmr-cross") -> its directory."""
    built = {}

    def get(kind: str):
        if kind not in built:
            out = tmp_path_factory.mktemp(kind.replace("-", "_"))
            built[kind] = tiny_encoders.build(kind, out, minilm)
        return built[kind]

    return get
