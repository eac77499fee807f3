"""Session-wide test setup that must happen before any test module is imported."""

import os

import torch

# Without a GPU the Triton kernels can only run in Triton's CPU interpreter (tests/ops).
# triton.jit picks interpreter or compiler when a kernel module is imported, and test modules
# anywhere may import them at collection time, so the switch is set here, first.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
