"""The native int8 linears on CPUs (csrc/linear_int8.c), called through ctypes.

Two kernels, each packing a layer's int8 weight [N, K] and per-channel scales once, at load,
into its own blob (uint8), which replaces the row-major weight:
- W8A8: the activations quantized to int8 on the fly, symmetric, one scale per block of 32
  inputs of a row (`schemes.quantize_int8_blocks`, as llama.cpp's Q8_0 activations), exact
  int32 dot products per block (vpdpbusd on AVX512_VNNI, vpmaddubsw on AVX2), the blocks'
  scaled sums added in float32. `schemes.int8_w8a8_reference` up to the order of that sum.
  What `--quantization int8` runs on CPUs (docs/quantization.md says why).
- W8A16: the weight dequantized in registers and multiplied by the bfloat16
  (AVX512_BF16) or float32 (AVX2 + FMA) activations: `x @ dequantize(W).T` up to the order of
  the float32 sums. What `int8_w8a16` runs.
Built per ISA as the other native kernels are (`cpu_kernels.set_isa`), so the AVX2 paths are
testable on a CPU with AVX-512. `ops/backend.py` picks the kernels once, at start
(`Kernels.int8_linears`); a layer no kernel serves keeps PyTorch's path.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from soberana.ops.cpu import kernels as cpu_kernels

SOURCE = Path(cpu_kernels.SOURCE).parent / "linear_int8.c"
PANEL = 64  # output columns per panel (NB in the C source)
W8A8_BLOCK = 32  # inputs per activation scale of the W8A8 kernel (QB in the C source)
# linear_int8_paths() bits
_BF16_PATH, _F32_PATH, _VNNI_PATH, _AVX2_W8A8_PATH = 1, 2, 4, 8
_OK = 0


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    i32, i64, ptr = ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p
    lib.linear_int8_paths.argtypes, lib.linear_int8_paths.restype = [], ctypes.c_int
    for fn in (lib.linear_int8_packed_bytes, lib.linear_w8a8_packed_bytes):
        fn.argtypes, fn.restype = [i64, i64], i64
    for fn in (lib.pack_int8, lib.pack_w8a8):
        fn.argtypes, fn.restype = [ptr, i64, ptr, i64, i64, ptr], ctypes.c_int
    for fn in (lib.linear_int8_bf16, lib.linear_int8_f32, lib.linear_w8a8_bf16,
               lib.linear_w8a8_f32):  # fmt: skip
        fn.argtypes = [ptr, i64, i64, i64, ptr, i64, ptr, ptr, i64, i32, ptr]
        fn.restype = ctypes.c_int
    lib.w8a8_quantized_row_bytes.argtypes, lib.w8a8_quantized_row_bytes.restype = [i64], i64
    lib.linear_w8a8_gelu_q8.argtypes = [ptr, i64, i64, i64, ptr, i64, ptr, ptr, i32, i32, ptr]
    lib.linear_w8a8_q8.argtypes = [ptr, i64, i64, ptr, i64, ptr, ptr, i64, i32, i32, ptr]
    lib.linear_w8a8_gelu_q8.restype = lib.linear_w8a8_q8.restype = ctypes.c_int
    return lib


@functools.cache
def _library_for(isa: str) -> ctypes.CDLL | None:
    lib = cpu_kernels.build_library(SOURCE, _load)
    return lib if lib is not None and lib.linear_int8_paths() != 0 else None


def library() -> ctypes.CDLL | None:
    """The int8 linear library built for the current ISA, or None (no path in this build)."""
    return _library_for(cpu_kernels.current_isa())


@dataclass(frozen=True)
class Int8Kernel:
    """One int8 CPU kernel as a layer holds it: pack at load, multiply per call."""

    name: str  # for the log and /v1/models
    activations: str  # "int8 per block of 32 (W8A8)" or "bfloat16/float32 (W8A16)"
    pack: Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None]  # (q, scale) -> blob
    unpack: Callable[[torch.Tensor, int, int], tuple[torch.Tensor, torch.Tensor]]
    # (blob, N, K, row ids [T]) -> those rows of q, int8 [T, K] (a tied embedding's lookup)
    rows: Callable[[torch.Tensor, int, int, torch.Tensor], torch.Tensor]
    # (bias, dtype) -> the bias as `linear` reads it for activations of dtype
    prepare_bias: Callable[[torch.Tensor | None, torch.dtype], torch.Tensor | None]
    # (x [M, K], blob, N, prepared bias) -> [M, N] in x's dtype
    linear: Callable[[torch.Tensor, torch.Tensor, int, torch.Tensor | None], torch.Tensor]
    serves: Callable[[torch.dtype], bool]  # whether activations of this dtype are served
    # the C function the decoder stack calls for bfloat16 activations (cpu_forward.h's
    # LinearFn; bias as prepare_bias(bias, bfloat16)), or 0
    stack_function: int


def int8_kernels() -> dict[str, Int8Kernel]:
    """The int8 kernels this CPU and build have: "w8a8" and/or "w8a16" (for backend.py)."""
    lib = library()
    if lib is None:
        return {}
    paths, found = lib.linear_int8_paths(), {}
    if paths & (_VNNI_PATH | _AVX2_W8A8_PATH):
        isa = "AVX512_VNNI vpdpbusd" if paths & _VNNI_PATH else "AVX2 vpmaddubsw"
        found["w8a8"] = Int8Kernel(
            name=f"soberana int8 CPU kernel W8A8 ({isa}; activations int8 per block of "
                 f"{W8A8_BLOCK})",
            activations=f"int8 per block of {W8A8_BLOCK} (W8A8)", pack=functools.partial(_pack, lib, "w8a8"),
            unpack=_unpack_w8a8, rows=_rows_w8a8, prepare_bias=_bias_w8a8,
            linear=functools.partial(_linear_w8a8, lib), serves=_serves_w8a8,
            stack_function=_address(lib.linear_w8a8_bf16))  # fmt: skip
    if paths & (_BF16_PATH | _F32_PATH):
        bf16 = "AVX512_BF16 (bf16 activations)" if paths & _BF16_PATH else ""
        f32 = "AVX2+FMA (float32 activations)" if paths & _F32_PATH else ""
        found["w8a16"] = Int8Kernel(
            name="soberana int8 CPU kernel W8A16, weight dequantized in registers: "
                 + ", ".join(p for p in (bf16, f32) if p),
            activations="bfloat16/float32 (W8A16)", pack=functools.partial(_pack, lib, "w8a16"),
            unpack=_unpack_w8a16, rows=_rows_w8a16,
            prepare_bias=functools.partial(_bias_w8a16, paths),
            linear=functools.partial(_linear_w8a16, lib),
            serves=functools.partial(_serves_w8a16, paths),
            stack_function=_address(lib.linear_int8_bf16) if paths & _BF16_PATH else 0)  # fmt: skip
    return found


def _address(fn) -> int:
    return ctypes.cast(fn, ctypes.c_void_p).value


def _pack(lib: ctypes.CDLL, kind: str, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
    """The blob of int8 weight q [N, K] and its scales [N], or None where the weight does not
    fit the kernel (K odd for W8A16, not a multiple of 32 for W8A8)."""
    multiple = W8A8_BLOCK if kind == "w8a8" else 2
    if not (q.dtype == torch.int8 and q.device.type == "cpu" and q.dim() == 2
            and q.shape[1] % multiple == 0 and q.numel() > 0):  # fmt: skip
        return None
    n, k = q.shape
    q = q.contiguous()
    scale = scale.detach().to(torch.float32).contiguous()
    size, pack = ((lib.linear_w8a8_packed_bytes, lib.pack_w8a8) if kind == "w8a8"
                  else (lib.linear_int8_packed_bytes, lib.pack_int8))  # fmt: skip
    blob = torch.empty(size(n, k), dtype=torch.uint8)
    if pack(q.data_ptr(), q.stride(0), scale.data_ptr(), n, k, blob.data_ptr()) != _OK:
        return None
    return blob


def _rows_w8a16(blob: torch.Tensor, n: int, k: int, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` of the int8 weight in a W8A16 blob (panels of [K / 2][64][2])."""
    n_pad = -(-n // PANEL) * PANEL
    panels = blob[: n_pad * k].view(torch.int8).view(n_pad // PANEL, k // 2, PANEL, 2)
    return panels[ids // PANEL, :, ids % PANEL, :].reshape(-1, k)


def _rows_w8a8(blob: torch.Tensor, n: int, k: int, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` of the int8 weight in a W8A8 blob (panels of [K / 4][64][4], q + 128)."""
    n_pad = -(-n // PANEL) * PANEL
    panels = blob[: n_pad * k].view(n_pad // PANEL, k // 4, PANEL, 4)
    return (panels[ids // PANEL, :, ids % PANEL, :].reshape(-1, k).to(torch.int16) - 128).to(torch.int8)


def _unpack_w8a16(blob: torch.Tensor, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [n, k], scale float32 [n]) of a W8A16 blob: what `pack` was given."""
    return _rows_w8a16(blob, n, k, torch.arange(n)), _scales(blob, n, k)


def _unpack_w8a8(blob: torch.Tensor, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [n, k], scale float32 [n]) of a W8A8 blob: what `pack` was given."""
    return _rows_w8a8(blob, n, k, torch.arange(n)), _scales(blob, n, k)


def _scales(blob: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The float32 scales after a blob's panels (either layout), a copy."""
    n_pad = -(-n // PANEL) * PANEL
    return blob[n_pad * k:].view(torch.float32)[:n].clone()


def _bias_w8a16(paths: int, bias: torch.Tensor | None, dtype: torch.dtype
                ) -> torch.Tensor | None:  # fmt: skip
    """For the AVX512_BF16 path bfloat16 padded with zeros to whole panels, for the float32
    path float32 as it is."""
    if bias is None:
        return None
    if dtype == torch.bfloat16 and paths & _BF16_PATH:
        return F.pad(bias.detach().to(torch.bfloat16), (0, -bias.shape[0] % PANEL)).contiguous()
    return bias.detach().to(torch.float32).contiguous()


def _bias_w8a8(bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """float32 padded with zeros to whole panels, whatever the activations' dtype."""
    if bias is None:
        return None
    return F.pad(bias.detach().to(torch.float32), (0, -bias.shape[0] % PANEL)).contiguous()


def _serves_w8a8(dtype: torch.dtype) -> bool:
    return dtype in (torch.bfloat16, torch.float32)


def _serves_w8a16(paths: int, dtype: torch.dtype) -> bool:
    return bool(dtype == torch.bfloat16 and paths & _BF16_PATH) or bool(
        dtype in (torch.float32, torch.bfloat16) and paths & _F32_PATH)  # fmt: skip


def _rows(x: torch.Tensor, serves: bool) -> torch.Tensor:
    if x.dim() != 2 or x.device.type != "cpu" or not serves:
        raise ValueError(f"int8 CPU linear: 2-D CPU input in a dtype this build serves "
                         f"expected, got {x.dtype} {tuple(x.shape)} on {x.device}")  # fmt: skip
    return x if x.stride(1) == 1 else x.contiguous()


def _linear_w8a8(lib: ctypes.CDLL, x: torch.Tensor, blob: torch.Tensor, n: int,
                 bias: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    """x [M, K] (bfloat16 or float32) quantized per block of 32, times a W8A8 blob of n
    outputs, plus the bias (`_bias_w8a8`): [M, n] in x's dtype."""
    x = _rows(x, _serves_w8a8(x.dtype))
    m, k = x.shape
    out = torch.empty(m, n, dtype=x.dtype)
    fn = lib.linear_w8a8_bf16 if x.dtype == torch.bfloat16 else lib.linear_w8a8_f32
    _check(fn(x.data_ptr(), x.stride(0), m, k, blob.data_ptr(), n, _ptr(bias), out.data_ptr(),
              n, torch.get_num_threads(), cpu_kernels.openmp_parallel()))  # fmt: skip
    return out


def _linear_w8a16(lib: ctypes.CDLL, x: torch.Tensor, blob: torch.Tensor, n: int,
                  bias: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    """x [M, K] (bfloat16 or float32) times a W8A16 blob of n outputs, plus the bias
    (`_bias_w8a16` for x's dtype): [M, n] in x's dtype."""
    paths = lib.linear_int8_paths()
    x = _rows(x, _serves_w8a16(paths, x.dtype))
    m, k = x.shape
    threads, gomp = torch.get_num_threads(), cpu_kernels.openmp_parallel()
    if x.dtype == torch.bfloat16 and paths & _BF16_PATH:
        out = torch.empty(m, n, dtype=torch.bfloat16)
        _check(lib.linear_int8_bf16(x.data_ptr(), x.stride(0), m, k, blob.data_ptr(), n,
                                    _ptr(bias), out.data_ptr(), n, threads, gomp))  # fmt: skip
        return out
    x32 = x.float()
    x32 = x32 if x32.stride(1) == 1 else x32.contiguous()
    out = torch.empty(m, n, dtype=torch.float32)
    _check(lib.linear_int8_f32(x32.data_ptr(), x32.stride(0), m, k, blob.data_ptr(), n,
                               _ptr(bias), out.data_ptr(), n, threads, gomp))  # fmt: skip
    return out if x.dtype == torch.float32 else out.to(x.dtype)


def w8a8_gelu_mlp_available() -> bool:
    """Whether this build fuses an MLP's GELU into its W8A8 linears (`w8a8_gelu_mlp`)."""
    lib = library()
    return lib is not None and bool(lib.linear_int8_paths() & _VNNI_PATH)


def w8a8_gelu_mlp(x: torch.Tensor, up: torch.Tensor, up_bias: torch.Tensor | None, inner: int,
                  down: torch.Tensor, down_bias: torch.Tensor | None, n: int) -> torch.Tensor:
    """down(GELU(up(x))) of two W8A8 blobs (`inner` and `n` outputs, biases as `_bias_w8a8`
    gives them): GELU and the per-block quantization of the down linear's input in the up
    linear's last step, so the [M, inner] activations stay int8. Each block is quantized
    from the same float32 values as `linear` would quantize (GELU's erf as PyTorch's
    vectorised one): x [M, K] float32 or bfloat16 -> [M, n] in x's dtype."""
    lib = library()
    x = _rows(x, _serves_w8a8(x.dtype))
    m, k = x.shape
    dtype, threads = cpu_kernels.DTYPES[x.dtype], torch.get_num_threads()
    gomp = cpu_kernels.openmp_parallel()
    quantized = torch.empty(m, lib.w8a8_quantized_row_bytes(inner), dtype=torch.uint8)
    _check(lib.linear_w8a8_gelu_q8(x.data_ptr(), x.stride(0), m, k, up.data_ptr(), inner,
                                   _ptr(up_bias), quantized.data_ptr(), dtype, threads, gomp))
    out = torch.empty(m, n, dtype=x.dtype)
    _check(lib.linear_w8a8_q8(quantized.data_ptr(), m, inner, down.data_ptr(), n, _ptr(down_bias),
                              out.data_ptr(), n, dtype, threads, gomp))
    return out


def _check(rc: int) -> None:
    if rc != _OK:
        raise ValueError(f"int8 CPU linear: the kernel refused the input (code {rc}): a size "
                         "past its limits, or K not the packed weight's")  # fmt: skip


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()
