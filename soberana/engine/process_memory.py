"""Allocator settings for a process that serves a model: opt-in, never done on import.

They change the whole process (every allocation, not only the engine's), so only an entry point
that owns its process applies them: the engine-core process (soberana/engine/core_process.py)
always, and `LLM(..., tune_process_memory=True)` (the default) in the caller's process.
"""

from __future__ import annotations

import os


def tune_process_memory() -> None:
    """Back large CPU tensors with transparent huge pages and keep freed activations mapped.

    THP_MEM_ALLOC_ENABLE: PyTorch's CPU allocator then madvises large blocks as huge pages, so
    each fresh multi-MB activation costs a few page faults instead of thousands (measured 2-4x
    faster KV gathers on CPU). PyTorch reads it once, at its first large CPU allocation, so this
    must run before the model is built. An explicit value in the environment is kept.
    mallopt: see `cpu_kernels.keep_freed_memory` (glibc only; RSS no longer shrinks).
    """
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    from soberana.ops.cpu import kernels as cpu_kernels  # imports torch: after the variable is set

    cpu_kernels.keep_freed_memory()


def prefer_passive_openmp() -> None:
    """Have OpenMP's idle threads sleep at once instead of spinning (OMP_WAIT_POLICY=PASSIVE).

    For a core that serves embeddings or reranking: its batches are a few dozen parallel ops
    of milliseconds each, and the API process (HTTP, tokenization, JSON) and often the clients
    run on the same cores. A spinning thread takes their CPU, and a thread preempted by them
    holds up its partner at every op's barrier. Measured on a 2-core Zen 4 at load ~10,
    all-MiniLM-L6-v2 in bfloat16 at concurrency 16: 26-33 sentences/s passive against 7-11
    active, alternating. libgomp reads it once, when torch loads it: call before torch is
    imported. An explicit value in the environment is kept.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
