"""Model operators: the portable PyTorch path (`layers.py`, `attention.py`), native CPU kernels
(`cpu/`) and Triton kernels for GPUs (`triton/`); `backend.py` chooses which serves, once."""

from __future__ import annotations

import functools
import importlib
import logging
from types import ModuleType


@functools.cache
def triton_module(name: str) -> ModuleType | None:
    """`soberana.ops.triton.<name>`, or None where it cannot be imported (CPU builds without
    Triton), logged once with the reason. Imported on first use, so CPU-only code never
    imports Triton. (The model's layers get theirs from backend.py, which fails loudly.)"""
    try:
        return importlib.import_module(f"soberana.ops.triton.{name}")
    except ImportError as e:
        logging.getLogger("soberana.ops").warning(
            "Triton kernels soberana.ops.triton.%s unavailable (%s): PyTorch path", name, e)
        return None
