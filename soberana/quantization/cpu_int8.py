"""The native int8 weight-only linear on CPUs (csrc/linear_int8.c), called through ctypes.

`pack` turns a layer's int8 weight [N, K] and its per-channel scales into the kernel's blob
(uint8: panels of 64 columns, then the scales as float32) once, at load; `linear` multiplies
by it. bfloat16 activations run the AVX512_BF16 path where the build has it; float32 ones (and
bfloat16 ones on CPUs without AVX512_BF16) the AVX2 + FMA path, in float32. Built per ISA as
the other native kernels are (`cpu_kernels.set_isa`), so the AVX2 path is testable on a CPU
with AVX-512. Where no path serves, these return None and the caller keeps PyTorch's.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
import torch.nn.functional as F

from soberana.ops import cpu_kernels

SOURCE = Path(cpu_kernels.SOURCE).parent / "linear_int8.c"
PANEL = 64  # output columns per panel (NB in the C source)
_BF16_PATH, _F32_PATH = 1, 2  # linear_int8_paths() bits
_OK = 0


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    i32, i64, ptr = ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p
    lib.linear_int8_paths.argtypes, lib.linear_int8_paths.restype = [], ctypes.c_int
    lib.linear_int8_packed_bytes.argtypes, lib.linear_int8_packed_bytes.restype = [i64, i64], i64
    lib.pack_int8.argtypes, lib.pack_int8.restype = [ptr, i64, ptr, i64, i64, ptr], ctypes.c_int
    for fn in (lib.linear_int8_bf16, lib.linear_int8_f32):
        fn.argtypes = [ptr, i64, i64, i64, ptr, i64, ptr, ptr, i64, i32, ptr]
        fn.restype = ctypes.c_int
    return lib


@functools.cache
def _library_for(isa: str) -> ctypes.CDLL | None:
    lib = cpu_kernels.build_library(SOURCE, _load)
    return lib if lib is not None and lib.linear_int8_paths() != 0 else None


def library() -> ctypes.CDLL | None:
    """The int8 linear library built for the current ISA, or None (no path in this build)."""
    return _library_for(cpu_kernels.current_isa())


def kernel_name() -> str | None:
    """What serves int8 linears on this CPU and build (for the log and /v1/models), or None."""
    lib = library()
    if lib is None:
        return None
    paths = lib.linear_int8_paths()
    bf16 = "AVX512_BF16 (bf16 activations)" if paths & _BF16_PATH else ""
    f32 = "AVX2+FMA (float32 activations)" if paths & _F32_PATH else ""
    return "soberana int8 CPU kernel, weight dequantized in registers: " + ", ".join(
        p for p in (bf16, f32) if p)  # fmt: skip


def pack(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
    """The blob of int8 weight q [N, K] (K even) and its scales [N], or None where this
    build has no kernel or the weight does not fit it."""
    lib = library()
    if lib is None or not (q.dtype == torch.int8 and q.device.type == "cpu" and q.dim() == 2
                           and q.shape[1] % 2 == 0 and q.numel() > 0):  # fmt: skip
        return None
    n, k = q.shape
    q = q.contiguous()
    scale = scale.detach().to(torch.float32).contiguous()
    blob = torch.empty(lib.linear_int8_packed_bytes(n, k), dtype=torch.uint8)
    if lib.pack_int8(q.data_ptr(), q.stride(0), scale.data_ptr(), n, k, blob.data_ptr()) != _OK:
        return None
    return blob


def unpack(blob: torch.Tensor, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [n, k], scale float32 [n]) of a blob: what `pack` was given."""
    n_pad = -(-n // PANEL) * PANEL
    panels = blob[: n_pad * k].view(torch.int8).view(n_pad // PANEL, k // 2, PANEL, 2)
    q = panels.permute(0, 2, 1, 3).reshape(n_pad, k)[:n]
    scale = blob[n_pad * k:].view(torch.float32)[:n]
    return q.contiguous(), scale.clone()


def pad_bias(bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """The bias as `linear` reads it for activations of `dtype`: bfloat16 padded with zeros to
    whole panels, float32 as it is."""
    if bias is None:
        return None
    if dtype == torch.bfloat16:
        return F.pad(bias.detach().to(torch.bfloat16), (0, -bias.shape[0] % PANEL)).contiguous()
    return bias.detach().to(torch.float32).contiguous()


def linear(x: torch.Tensor, blob: torch.Tensor, n: int, bias_bf16: torch.Tensor | None,
           bias_f32: torch.Tensor | None) -> torch.Tensor | None:  # fmt: skip
    """x [M, K] (bfloat16 or float32, on the CPU) times a `pack`ed weight of n outputs, plus
    the bias (`pad_bias` for each dtype, or None): [M, n] in x's dtype. None where no path of
    this build serves x (the caller's path)."""
    lib = library()
    if lib is None or x.dim() != 2 or x.device.type != "cpu":
        return None
    paths = lib.linear_int8_paths()
    m, k = x.shape
    threads, gomp = torch.get_num_threads(), cpu_kernels.openmp_parallel()
    if x.dtype == torch.bfloat16 and paths & _BF16_PATH:
        x = x if x.stride(1) == 1 else x.contiguous()
        out = torch.empty(m, n, dtype=torch.bfloat16)
        rc = lib.linear_int8_bf16(x.data_ptr(), x.stride(0), m, k, blob.data_ptr(), n,
                                  _ptr(bias_bf16), out.data_ptr(), n, threads, gomp)  # fmt: skip
        return out if rc == _OK else None
    if x.dtype not in (torch.float32, torch.bfloat16) or not paths & _F32_PATH:
        return None
    x32 = x.float()
    x32 = x32 if x32.stride(1) == 1 else x32.contiguous()
    out = torch.empty(m, n, dtype=torch.float32)
    rc = lib.linear_int8_f32(x32.data_ptr(), x32.stride(0), m, k, blob.data_ptr(), n,
                             _ptr(bias_f32), out.data_ptr(), n, threads, gomp)  # fmt: skip
    if rc != _OK:
        return None
    return out if x.dtype == torch.float32 else out.to(x.dtype)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()
