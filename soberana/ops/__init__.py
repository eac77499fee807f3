"""Model operators: a portable PyTorch path, and Triton kernels (`triton_*.py`) for GPUs."""

from __future__ import annotations

import functools
import importlib
from types import ModuleType


@functools.cache
def triton_module(name: str) -> ModuleType | None:
    """`soberana.ops.<name>`, a Triton kernel module, or None where Triton is missing (CPU
    builds). Imported on first use, so CPU-only code never imports Triton."""
    try:
        return importlib.import_module(f"soberana.ops.{name}")
    except ImportError:
        return None
