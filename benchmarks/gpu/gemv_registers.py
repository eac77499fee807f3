"""Registers and spills of the few-row GEMV (`soberana/ops/triton/gemv.py`) compiled for
sm_90 (H100/H200) on any host, no GPU needed: Triton lowers the kernel for the target and its
bundled `ptxas -v` reports registers and spill bytes per thread. The pointer and size
arguments carry the divisibility the JIT sees at Llama shapes (16), and M = 1 is a constant
as the JIT specializes it, so the code is what the GPU runs.

    python benchmarks/gpu/gemv_registers.py [--rows 1,2,4,5,8]

A spill, or a one-row kernel whose registers differ from before, is worth a GPU timing
(`decode_kernels.py --rows ...`) before it ships.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))
from soberana.ops.triton import gemv as G  # noqa: E402

# weight format: (pointer type of W, of its scales / zero points, torch dtype for the config)
FORMATS = {"bf16": ("*bf16", "*bf16", torch.bfloat16), "fp32": ("*fp32", "*fp32", torch.float32),
           "int8": ("*i8", "*bf16", torch.int8), "fp8": ("*fp8e4nv", "*bf16", torch.float8_e4m3fn),
           "int4": ("*u8", "*bf16", torch.uint8)}  # fmt: skip


def compile_ptx(rows: int, fmt: str, gated: bool, cfg: G.GemvConfig) -> str:
    w_type, s_type, _ = FORMATS[fmt]
    act = "*fp32" if fmt == "fp32" else "*bf16"
    int4 = fmt == "int4"
    sig = {"x_ptr": act, "res_ptr": act, "norm_w_ptr": act, "w_ptr": w_type, "bias_ptr": act,
           "out_ptr": act, "res_out_ptr": act, "scale_ptr": s_type,
           "zero_ptr": "*u8" if int4 else w_type, "M": "i32", "N": "i32", "K": "i32",
           "eps": "fp32", "stride_xm": "i32", "stride_rm": "i32", "stride_om": "i32",
           "stride_wn": "i32", "stride_sn": "i32"}  # fmt: skip
    padded = triton.next_power_of_2(rows)
    consts = {"NORM": True, "HAS_RESIDUAL": True, "HAS_BIAS": False, "GATED": gated,
              "EVEN": True, "FULL": rows == padded, "PDL": True,
              "ROW_SCALE": fmt in ("int8", "fp8"), "INT4": int4, "GROUP": 128 if int4 else 1,
              "ROWS": padded, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k,
              "CHUNK": cfg.chunk_k}  # fmt: skip
    if rows == 1:
        consts["M"] = 1  # the JIT specializes an integer argument equal to 1
    sig.update({name: "constexpr" for name in consts})
    names = list(sig)
    aligned = [n for n in names if sig[n].startswith("*")] + [
        "N", "K", "stride_xm", "stride_rm", "stride_om", "stride_wn"] + (["stride_sn"] * int4)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    kernel = triton.compile(ASTSource(G._gemv_kernel, sig, consts, attrs),
                            target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    return kernel.asm["ptx"]


def ptxas_report(ptx: str) -> tuple[int, int]:
    """(registers, spill store bytes) per thread."""
    ptxas = Path(triton.__file__).parent / "backends/nvidia/bin/ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        Path(src).write_text(ptx)
        res = subprocess.run([str(ptxas), "-v", "-arch=sm_90a", src, "-o",
                              os.path.join(tmp, "k.cubin")], capture_output=True, text=True,
                             check=True)  # fmt: skip
    regs = int(re.search(r"Used (\d+) registers", res.stderr).group(1))
    spill = int(re.search(r"(\d+) bytes spill stores", res.stderr).group(1))
    return regs, spill


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,2,4,5,8")
    ap.add_argument("--formats", default=",".join(FORMATS))
    args = ap.parse_args()
    print(f"triton {triton.__version__}, target sm_90a")
    for fmt in args.formats.split(","):
        for rows in (int(r) for r in args.rows.split(",")):
            for gated in (False, True):
                cfg = G.default_config(FORMATS[fmt][2], fmt == "int4", rows)
                regs, spill = ptxas_report(compile_ptx(rows, fmt, gated, cfg))
                print(f"{fmt:>5} rows {rows} {'gate/up' if gated else 'plain  '} {cfg}: "
                      f"{regs} registers, {spill} bytes spilled", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
