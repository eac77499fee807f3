"""Run from outside the checkout against an installed (non-editable) wheel: the native CPU
kernels must build from the packaged sources and headers wherever a C compiler exists, and the
bf16 linear kernel must be active on CPUs with AVX512_BF16."""

import pathlib
import shutil

import soberana
from soberana.ops import cpu_kernels

here = pathlib.Path(soberana.__file__).parent
assert "site-packages" in str(here), f"soberana imported from the checkout: {here}"
headers = sorted(p.name for p in (here / "ops" / "csrc").glob("*.h"))
assert headers, "the wheel ships no C headers"
assert shutil.which("cc"), "no C compiler on this host"
assert cpu_kernels._library() is not None, "paged attention kernel did not build"
assert cpu_kernels._layers_library() is not None, "small-layer kernels did not build"
flags = pathlib.Path("/proc/cpuinfo").read_text()
if " avx512_bf16" in flags:
    assert cpu_kernels._linear_library() is not None, "bf16 linear kernel inactive on AVX512_BF16"
print("installed wheel OK:", here, "headers:", headers)
