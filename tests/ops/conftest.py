"""Run the Triton kernels in Triton's CPU interpreter when the machine has no GPU."""

import os
import sys

import pytest
import torch

# triton.jit chooses interpreter or compiler when it decorates a kernel, i.e. when a
# soberana.ops.triton.* module is imported: set the switch first and drop any copy that
# was imported without it. On a GPU machine tests/gpu covers the compiled kernels instead.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    for _name in [m for m in sys.modules if m.startswith("soberana.ops.triton.")]:
        del sys.modules[_name]


def _cpu_isas() -> list[str]:
    """The native kernels' builds to test here: this CPU's, and on a CPU with AVX-512 also the
    AVX2 + FMA build (the path of CPUs without AVX-512), so that neither rots."""
    import platform

    from soberana.ops.cpu import kernels as cpu_kernels

    isas = ["native"]
    if platform.machine() in ("x86_64", "AMD64") and "avx512f" in cpu_kernels.cpu_flags():
        isas.append("avx2")
    return isas


@pytest.fixture(params=_cpu_isas())
def cpu_isa(request):
    """Run the test with the native kernels built for each ISA of _cpu_isas (set_isa)."""
    from soberana.ops.cpu import kernels as cpu_kernels

    cpu_kernels.set_isa(request.param)
    try:
        yield request.param
    finally:
        cpu_kernels.set_isa("native")
