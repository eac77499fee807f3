"""Triton kernels for GPUs (and Triton's CPU interpreter in tests). Importing any of these
modules imports Triton: `soberana/ops/backend.py` does it once, where the backend is chosen."""
