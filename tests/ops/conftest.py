"""Run the Triton kernels in Triton's CPU interpreter when the machine has no GPU."""

import os
import sys

import torch

# triton.jit chooses interpreter or compiler when it decorates a kernel, i.e. when a
# soberana.ops.triton_* module is imported: set the switch first and drop any copy that
# was imported without it. On a GPU machine tests/gpu covers the compiled kernels instead.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    for _name in [m for m in sys.modules if m.startswith("soberana.ops.triton_")]:
        del sys.modules[_name]
