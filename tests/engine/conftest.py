"""Fixtures: tiny models of every architecture and their transformers references."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.engine.tiny_models import ARCHS, build_tiny_model


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    out = {}
    for arch in ARCHS:
        d = root / arch
        d.mkdir()
        out[arch] = build_tiny_model(d, arch)
    return out


@pytest.fixture(scope="session")
def hf_models(tiny_models):
    """The transformers reference on the same weights, float32, eval mode."""
    import transformers

    cache = {}

    def get(arch: str):
        if arch not in cache:
            m = transformers.AutoModelForCausalLM.from_pretrained(
                tiny_models[arch], dtype=torch.float32
            )
            cache[arch] = m.eval()
        return cache[arch]

    return get


