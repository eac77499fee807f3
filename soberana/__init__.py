"""Soberana: a self-hosted LLM inference stack."""

from __future__ import annotations

from typing import TYPE_CHECKING

# Importing soberana changes nothing process-wide: the allocator settings (THP, mallopt) are
# applied by the engine-core process and by LLM(tune_process_memory=True): engine/process_memory.py.

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
