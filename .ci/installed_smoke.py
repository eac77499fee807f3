"""Run from outside the checkout against an installed (non-editable) wheel: the native CPU
kernels must build from the packaged sources and headers wherever a C compiler exists, and the
bf16 linear kernel must be active on CPUs with AVX512_BF16; the compute backend chosen at start
must be the native one, with its decoder stack there."""

import pathlib
import shutil

import torch

import soberana
from soberana.ops.backend import select_backend
from soberana.ops.cpu import kernels as cpu_kernels

here = pathlib.Path(soberana.__file__).parent
assert "site-packages" in str(here), f"soberana imported from the checkout: {here}"
headers = sorted(p.name for p in (here / "ops" / "csrc").glob("*.h"))
assert headers, "the wheel ships no C headers"
assert shutil.which("cc"), "no C compiler on this host"
assert cpu_kernels.attention_library() is not None, "paged attention kernel did not build"
assert cpu_kernels.layers_library() is not None, "small-layer kernels did not build"
flags = pathlib.Path("/proc/cpuinfo").read_text()
if " avx512_bf16" in flags:
    assert cpu_kernels.linear_library() is not None, "bf16 linear kernel inactive on AVX512_BF16"
backend = select_backend("auto", torch.device("cpu"), torch.bfloat16)
assert backend.name == "native", backend.report()
if " avx512_bf16" in flags:
    assert "decoder stack" in backend.implementations, backend.report()
print("installed wheel OK:", here, "headers:", headers)
