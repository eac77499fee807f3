"""Soberana: a self-hosted LLM inference stack."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

# PyTorch's CPU allocator backs large tensors with transparent huge pages when this is set:
# each fresh multi-MB activation then costs a few page faults instead of thousands
# (measured 2-4x faster KV gathers on CPU). It must be set before torch allocates.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "__version__"]

if TYPE_CHECKING:
    from soberana.engine.llm import LLM
    from soberana.engine.sampling_params import SamplingParams


def __getattr__(name: str):
    # Lazy so that `soberana bench` and `soberana gateway` never import torch.
    if name == "LLM":
        from soberana.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from soberana.engine.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(name)
