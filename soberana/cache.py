"""Where Soberana keeps built artefacts (models, compiled kernels): one root for every package."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """Where built-in artefacts live: $SOBERANA_CACHE or ~/.cache/soberana."""
    return Path(os.environ.get("SOBERANA_CACHE", Path.home() / ".cache" / "soberana"))
