"""Native CPU kernels: C sources in `csrc/`, compiled at first use and called through ctypes.

The library is built by the system C compiler ($CC, else `cc`) once and cached as
`<cache_root>/kernels/<hash>.so`, the hash covering source, headers, flags, compiler and target
CPU; a build is logged with its time and the compiler's messages (`<hash>.log` beside it).
`set_isa` picks the instruction sets they are built for (EngineConfig.cpu_isa): this CPU's
("native": AVX-512 where it has it), AVX2 + FMA ("avx2", x86-64-v3: the path of CPUs without
AVX-512, testable on one with it), or plain C ("portable").
Without a compiler, or when the build fails, the libraries are None and `ops/backend.py`
chooses the PyTorch path at start, saying why (`unavailable_reason`). The wrappers below
serve the layouts the model runner hands them and raise ValueError for any other: they are
chosen once, never tried per call. ctypes releases the GIL during a call.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from soberana.cache import cache_root

logger = logging.getLogger("soberana.ops")

# The C sources stay in ops/csrc/ (packaged as soberana.ops data, pyproject.toml).
CSRC = Path(__file__).resolve().parent.parent / "csrc"

SOURCE = CSRC / "paged_attention.c"
LAYERS_SOURCE = CSRC / "cpu_layers.c"
LINEAR_SOURCE = CSRC / "linear_bf16.c"
ENCODER_SOURCE = CSRC / "encoder_layers.c"
FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-pthread")
# For compilers that reject -march=native (or do not know this CPU).
PORTABLE_FLAGS = ("-O3", "-fPIC", "-shared", "-pthread")
ISA_FLAGS = {
    "native": FLAGS,
    "avx2": ("-O3", "-march=x86-64-v3", "-mtune=native", "-fPIC", "-shared", "-pthread"),
    "portable": PORTABLE_FLAGS,
}
_isa = "native"

DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
# The kernel's return codes (paged_attention.c).
_OK, _UNSUPPORTED, _BAD_BLOCK, _NO_MEMORY, _BAD_QUERIES = 0, 1, 2, 3, 4


def compile_library(source: Path, flags: Sequence[str]) -> Path:
    """The shared library of `source` built with `flags`: from the cache, or compiled into it.

    Published with an atomic rename, so processes building at once are safe. Raises OSError
    (no compiler) or subprocess.CalledProcessError (a failed build).
    """
    cc = shlex.split(os.environ.get("CC", "cc"))
    version = _run([*cc, "--version"])
    # With -march=native the macros the compiler predefines name this CPU's features, so a
    # cache shared between machines never hands one a library built for the other.
    target = _run([*cc, *(f for f in flags if f != "-shared"), "-dM", "-E", "-x", "c", os.devnull])
    key = hashlib.sha256(source.read_bytes())
    for header in sorted(source.parent.glob("*.h")):  # what the sources #include
        key.update(b"\0" + header.read_bytes())
    for part in (" ".join(flags), version, target, platform.machine()):
        key.update(b"\0" + part.encode())
    path = cache_root() / "kernels" / f"{key.hexdigest()[:32]}.so"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=path.parent)
    os.close(fd)
    t0 = time.perf_counter()
    try:
        result = subprocess.run([*cc, *flags, "-o", tmp, str(source), "-lm"], capture_output=True,
                                text=True, check=True, timeout=300)  # fmt: skip
        os.chmod(tmp, 0o755)  # mkstemp's 0600 would keep other users of the cache out
        messages = (result.stdout + result.stderr).strip()
        path.with_suffix(".log").write_text(f"{shlex.join([*cc, *flags])} {source.name}\n{messages}\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    logger.info("Built native CPU kernels %s (%s) in %.1fs, cached as %s%s", source.name,
                " ".join(flags), time.perf_counter() - t0, path,
                f"; compiler said: {messages[-500:]}" if messages else "")  # fmt: skip
    return path


def _run(cmd: list[str]) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=300).stdout


def load_library(path: Path) -> ctypes.CDLL:
    """A built kernel library, its functions typed."""
    lib = ctypes.CDLL(str(path))
    i32, i64, ptr = ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p
    lib.paged_attention.argtypes = [
        ptr, i64, ptr, ptr, i64, ptr, i64, i32, ptr, ptr, ptr,  # tensors, strides, sizes
        i32, i32, i32, i32, i32, i32, ctypes.c_float, i32, ptr,  # shape, dtype, scale, threads
    ]  # fmt: skip
    lib.paged_attention.restype = ctypes.c_int
    if hasattr(lib, "simd_level"):  # builds of older sources (benchmarks' A/B) lack it
        lib.simd_level.argtypes, lib.simd_level.restype = [], ctypes.c_int
    return lib


def load_layers_library(path: Path) -> ctypes.CDLL:
    """A built cpu_layers library, its functions typed."""
    lib = ctypes.CDLL(str(path))
    i32, i64, ptr, f32 = ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
    lib.add_rms_norm.argtypes = [ptr, i64, ptr, i64, ptr, i64, ptr, ptr, i64, i64, i64, i32, i32,
                                 f32, i32, ptr]  # fmt: skip
    lib.silu_and_mul.argtypes = [ptr, i64, ptr, i64, i64, i64, i32, i32, ptr]
    lib.rope_and_cache.argtypes = [ptr, i64, ptr, ptr, ptr, i64, ptr, ptr, ptr, ptr, i64, i64,
                                   i32, i32, i32, i32, i32, ptr]  # fmt: skip
    lib.argmax_rows.argtypes = [ptr, i64, ptr, i64, i64, i32, i32, ptr]
    for fn in (lib.add_rms_norm, lib.silu_and_mul, lib.rope_and_cache, lib.argmax_rows):
        fn.restype = ctypes.c_int
    return lib


def load_linear_library(path: Path) -> ctypes.CDLL:
    """A built linear_bf16 library, its functions typed."""
    lib = ctypes.CDLL(str(path))
    i32, i64, ptr = ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p
    # one ABI per dtype; builds of older sources (benchmarks' A/B) lack the float32 one
    for suffix in ("bf16", "f32") if hasattr(lib, "linear_f32") else ("bf16",):
        signatures = {
            f"linear_{suffix}_available": ([], ctypes.c_int),
            f"linear_{suffix}_packed_elems": ([i64, i64], i64),
            f"pack_{suffix}": ([ptr, i64, i64, i64, ptr], ctypes.c_int),
            f"linear_{suffix}": ([ptr, i64, i64, i64, ptr, i64, ptr, ptr, i64, i32, ptr],
                                 ctypes.c_int),
        }
        for name, (argtypes, restype) in signatures.items():
            getattr(lib, name).argtypes, getattr(lib, name).restype = argtypes, restype
    return lib


@functools.cache
def attention_library() -> ctypes.CDLL | None:
    """The paged-attention library, or None (the PyTorch path)."""
    return build_library(SOURCE, load_library)


@functools.cache
def layers_library() -> ctypes.CDLL | None:
    """The small layers' library (norm, rotary + cache write, SiLU-and-mul, argmax), or None."""
    return build_library(LAYERS_SOURCE, load_layers_library)


def load_encoder_library(path: Path) -> ctypes.CDLL:
    """A built encoder_layers library, its functions typed."""
    lib = ctypes.CDLL(str(path))
    i32, i64, ptr, f32 = ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
    lib.encoder_attention_simd.argtypes, lib.encoder_attention_simd.restype = [], ctypes.c_int
    lib.encoder_attention.argtypes = [ptr, i64, ptr, i64, i64, i64, i32, f32, ptr, i64, i32, ptr]
    lib.add_layer_norm.argtypes = [ptr, i64, ptr, i64, ptr, ptr, ptr, i64, i64, i64, i32, f32,
                                   i32, ptr]  # fmt: skip
    lib.encoder_attention.restype = lib.add_layer_norm.restype = ctypes.c_int
    return lib


@functools.cache
def encoder_library() -> ctypes.CDLL | None:
    """The encoder layers' library (packed-sequence attention, add + LayerNorm), or None."""
    return build_library(ENCODER_SOURCE, load_encoder_library)


@functools.cache
def linear_library() -> ctypes.CDLL | None:
    """The bfloat16 linear library where it has a kernel (AVX512_BF16, or AVX2 + FMA), or None."""
    lib = build_library(LINEAR_SOURCE, load_linear_library)
    return lib if lib is not None and lib.linear_bf16_available() in (1, 2) else None


# linear_bf16_available()'s answers: which instructions serve bfloat16 linears
BF16_LINEAR_PATHS = {1: "AVX512_BF16", 2: "AVX2+FMA (bfloat16 widened to float32 in registers)"}


@functools.cache
def linear_f32_library() -> ctypes.CDLL | None:
    """The linear library where it has its float32 kernel (AVX-512F, or AVX2 + FMA), or None."""
    lib = build_library(LINEAR_SOURCE, load_linear_library)
    return lib if lib is not None and lib.linear_f32_available() == 1 else None


def build_library(source: Path, load: Callable[[Path], ctypes.CDLL]) -> ctypes.CDLL | None:
    """`source` built (or taken from the cache) and loaded with `load`, or None, logged why
    (no compiler, or a failed build; `unavailable_reason` keeps it)."""
    try:
        try:
            path = compile_library(source, ISA_FLAGS[_isa])
        except subprocess.CalledProcessError:
            path = compile_library(source, PORTABLE_FLAGS)
            logger.info("Native CPU kernels built without -march (the compiler refused %s)",
                        " ".join(ISA_FLAGS[_isa]))  # fmt: skip
        return load(path)
    except subprocess.CalledProcessError as e:
        why = f"{shlex.join(e.cmd)} failed: {(e.stderr or '').strip()[-500:]}"
    except (OSError, subprocess.SubprocessError) as e:
        why = str(e)
    logger.info("Native CPU kernels (%s) unavailable: %s", source.name, why)
    _failures[source.name] = why
    return None


# source name -> why its build failed (for the backend's log line)
_failures: dict[str, str] = {}


def unavailable_reason() -> str:
    """Why a native library could not be built, or "" where every one was."""
    return "; ".join(f"{name}: {why}" for name, why in _failures.items())


def set_isa(isa: str) -> None:
    """Build (or take from the cache) the native kernels for `isa` from now on: "native",
    "avx2" or "portable" (see ISA_FLAGS). Process-wide; libraries already loaded for another
    ISA are dropped from use."""
    global _isa
    if isa not in ISA_FLAGS:
        raise ValueError(f"cpu_isa must be one of {', '.join(ISA_FLAGS)}; got {isa!r}")
    if isa == _isa:
        return
    _isa = isa
    _failures.clear()
    attention_library.cache_clear()
    layers_library.cache_clear()
    encoder_library.cache_clear()
    linear_library.cache_clear()
    linear_f32_library.cache_clear()
    from soberana.ops.cpu import decoder_stack

    decoder_stack.forward_library.cache_clear()


def current_isa() -> str:
    """The ISA the native kernels are built for (set_isa)."""
    return _isa


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (/proc/cpuinfo; empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16_matmul(isa: str) -> bool:
    """Whether bfloat16 matmuls run natively here (AVX512_BF16 or AMX-BF16) with kernels built
    for `isa`: False for a build without AVX-512."""
    return isa == "native" and bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


@functools.cache
def openmp_parallel() -> int | None:
    """The address of `GOMP_parallel` in torch's own OpenMP runtime, or None.

    The kernel's threads must be that runtime's: after each parallel op its workers spin for
    a while (libgomp's GOMP_SPINCOUNT), and a thread of our own started then shares a core
    with one of them (measured: in a decode step, the second of 2 threads did a third of the
    work). torch loads its runtime with RTLD_GLOBAL, so the process's symbol table has it.
    """
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        return ctypes.cast(ctypes.CDLL(None).GOMP_parallel, ctypes.c_void_p).value
    except AttributeError:
        return None


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    query_start: torch.Tensor | None = None,
) -> None:
    """Causal attention of q [T, Hq, D] over the paged cache, into out [T, Hq, D].

    Without `query_start`, row b is one decode query of sequence b over its first seq_lens[b]
    cached keys. With it ([B + 1] int32 offsets), sequence b's n_b = query_start[b + 1] -
    query_start[b] queries are rows query_start[b]... and its i-th sees keys [0, seq_lens[b]
    - n_b + i] (its own and earlier ones, already written to the cache). Raises ValueError
    for tensors on another device, in another dtype or layout.
    """
    if not _servable(q, k_cache, v_cache, block_table, seq_lens, out, query_start):
        raise ValueError("paged_attention: tensors must be CPU, one kernel dtype "
                         f"({', '.join(map(str, DTYPES))}), q rows of unit-stride heads, "
                         "contiguous caches and out, int32 block_table/seq_lens/query_start")  # fmt: skip
    num_heads, head_dim = q.shape[1:]
    num_seqs = q.shape[0] if query_start is None else query_start.shape[0] - 1
    num_blocks, block_size, num_kv_heads = k_cache.shape[:3]
    rc = attention_library().paged_attention(
        q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), num_blocks,
        block_table.data_ptr(), block_table.stride(0), block_table.shape[1],
        seq_lens.data_ptr(), _ptr(query_start), out.data_ptr(), num_seqs, num_heads,
        num_kv_heads, head_dim, block_size, DTYPES[q.dtype], scale, torch.get_num_threads(),
        openmp_parallel(),
    )  # fmt: skip
    raise_attention_error(rc, num_blocks, block_table.shape[1], block_size)


def paged_attention_step(q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None,
                         k_cache: torch.Tensor, v_cache: torch.Tensor, meta,
                         scale: float) -> torch.Tensor:  # fmt: skip
    """A step's attention (ops.attention.paged_attention's signature) on the native kernel,
    which reads each sequence's K/V from the pool once per tile of its queries (the PyTorch
    path copies it several times, and calls one SDPA per prefill)."""
    out = torch.empty(q.shape, dtype=q.dtype)
    prefills = meta.num_decodes < len(meta.query_lens_cpu)
    paged_attention(q, k_cache, v_cache, meta.block_table, meta.seq_lens, scale, out,
                    meta.query_start_loc if prefills else None)  # fmt: skip
    return out


def raise_attention_error(rc: int, num_blocks: int, max_blocks: int, block_size: int) -> None:
    """Raise what a paged_attention return code means, where it is an error of the input."""
    if rc == _BAD_BLOCK:
        raise IndexError(
            f"block_table: a block id outside [0, {num_blocks}), or seq_lens longer than "
            f"{max_blocks} blocks of {block_size} tokens"
        )
    if rc == _BAD_QUERIES:
        raise ValueError("query_start: offsets must ascend, with no more queries than seq_lens")
    if rc == _NO_MEMORY:
        raise MemoryError("paged_attention: no memory for its per-thread workspace")
    if rc == _UNSUPPORTED:
        raise ValueError("paged_attention: head counts, head size or dtype unsupported by this "
                         "build")  # fmt: skip


def _servable(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    out: torch.Tensor,
    query_start: torch.Tensor | None,
) -> bool:
    tensors = (q, k_cache, v_cache, out)
    if any(t.device.type != "cpu" for t in tensors) or q.dtype not in DTYPES:
        return False
    if not (q.dim() == 3 and k_cache.dim() == 4 and k_cache.shape == v_cache.shape):
        return False
    num_tokens, num_heads, head_dim = q.shape
    return (
        k_cache.dtype == v_cache.dtype == out.dtype == q.dtype
        and k_cache.shape[3] == head_dim and num_heads % k_cache.shape[2] == 0
        and q.stride(2) == 1 and q.stride(1) == head_dim  # rows may be apart (a slice of qkv)
        and out.shape == q.shape and out.is_contiguous()
        and k_cache.is_contiguous() and v_cache.is_contiguous()
        and attention_metadata_servable(block_table, seq_lens, query_start, num_tokens)
    )  # fmt: skip


def attention_metadata_servable(block_table: torch.Tensor, seq_lens: torch.Tensor,
                                query_start: torch.Tensor | None, num_tokens: int) -> bool:  # fmt: skip
    """Whether the kernel can read a step's block table, lengths and query offsets (None: one
    query per sequence, num_tokens sequences) as they are laid out."""
    num_seqs = num_tokens
    if query_start is not None:
        num_seqs = query_start.shape[0] - 1
        if not (query_start.device.type == "cpu" and query_start.dtype == torch.int32
                and query_start.dim() == 1 and query_start.is_contiguous() and num_seqs >= 0
                and int(query_start[-1]) <= num_tokens and int(query_start[0]) >= 0):  # fmt: skip
            return False
    return (
        block_table.device.type == seq_lens.device.type == "cpu"
        and block_table.dtype == seq_lens.dtype == torch.int32
        and block_table.dim() == 2 and block_table.stride(1) == 1
        and block_table.shape[0] >= num_seqs
        and seq_lens.dim() == 1 and seq_lens.is_contiguous() and seq_lens.numel() >= num_seqs
    )  # fmt: skip


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -2, -3, -4


@functools.cache
def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed activations for reuse instead of handing them back.

    By default a block over a few MB is its own mmap, unmapped when freed, and the next step
    page-faults the same amount in again, zero-filled: measured, a prefill of 8,192 tokens of
    a 125M model spent ~0.8 s of 3.7 s that way. This raises the mmap threshold to glibc's
    maximum (32 MB), and since blocks past that maximum would still be mmaps (a float32
    prefill's MLP activations: 8,192 x 3,072 floats are 100 MB), stops malloc from mmapping
    at all (M_MMAP_MAX 0: every block from the heap), and stops trimming the heap, so the
    process keeps its peak activation memory (the cost: RSS does not shrink after a large
    batch). Measured on a 2-core Emerald Rapids, float32 at forced AVX2, one thread, 64
    prompts of 128 tokens prefilled in one step: 291 against 210 tok/s without M_MMAP_MAX
    (11% of the time had gone to zeroing fresh pages in the linears' outputs).
    Process-wide, once; False where the C library has no `mallopt` (not glibc).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except AttributeError:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, 32 << 20) == 1
    ok = mallopt(_M_MMAP_MAX, 0) == 1 and ok
    ok = mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1 and ok
    ok = mallopt(_M_TOP_PAD, 64 << 20) == 1 and ok
    return ok


def _check(rc: int, op: str) -> None:
    if rc != _OK:
        raise ValueError(f"{op}: unsupported by this build (dtype, or a size past its limits)")


def _layout_error(op: str, wants: str) -> ValueError:
    return ValueError(f"{op}: needs {wants}")


def _cpu_kernel_dtypes(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and (not t.is_floating_point() or t.dtype in DTYPES)
               for t in tensors)  # fmt: skip


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(torch_rms_norm(x + residual), x + residual), or (torch_rms_norm(x), None) without a
    residual, for x [T, H] with unit-stride rows, in one pass."""
    if not (x.dim() == 2 and x.stride(1) == 1 and weight.shape == (x.shape[1],)
            and weight.stride(0) == 1 and _cpu_kernel_dtypes(x, weight)
            and (residual is None or (residual.shape == x.shape and residual.dtype == x.dtype
                                      and residual.stride(1) == 1))):  # fmt: skip
        raise _layout_error("add_rms_norm", "CPU x [T, H] with unit-stride rows, weight [H], "
                            "residual like x")  # fmt: skip
    rows, hidden = x.shape
    out = torch.empty(rows, hidden, dtype=torch.promote_types(x.dtype, weight.dtype))
    new_residual = None if residual is None else torch.empty_like(x)
    rc = layers_library().add_rms_norm(
        x.data_ptr(), x.stride(0), _ptr(residual), 0 if residual is None else residual.stride(0),
        _ptr(new_residual), hidden, weight.data_ptr(), out.data_ptr(), hidden, rows, hidden,
        DTYPES[x.dtype], DTYPES[weight.dtype], eps, torch.get_num_threads(), openmp_parallel(),
    )  # fmt: skip
    _check(rc, "add_rms_norm")
    return out, new_residual


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """torch_rms_norm(x) for x [T, H] with unit-stride rows."""
    return add_rms_norm(x, None, weight, eps)[0]


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up of a fused [T, 2I] projection (unit-stride rows)."""
    if not (gate_up.dim() == 2 and gate_up.stride(1) == 1 and gate_up.shape[1] % 2 == 0
            and _cpu_kernel_dtypes(gate_up)):  # fmt: skip
        raise _layout_error("silu_and_mul", "CPU gate_up [T, 2I] with unit-stride rows")
    rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(rows, inter, dtype=gate_up.dtype)
    rc = layers_library().silu_and_mul(gate_up.data_ptr(), gate_up.stride(0), out.data_ptr(),
                                       inter, rows, inter, DTYPES[gate_up.dtype],
                                       torch.get_num_threads(), openmp_parallel())  # fmt: skip
    _check(rc, "silu_and_mul")
    return out


def rope_and_cache(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    num_heads: int,
) -> torch.Tensor:
    """From a fused projection qkv [T, (Hq + 2 Hkv) D]: q [T, Hq, D] with rotary embedding;
    k (rotated) and v are written to their cache slots (-1: none), as torch_rotary_embedding
    then write_kv do."""
    num_kv_heads, head_dim = k_cache.shape[-2:]
    if not (qkv.dim() == 2 and qkv.stride(1) == 1
            and qkv.shape[1] == (num_heads + 2 * num_kv_heads) * head_dim
            and k_cache.dtype == v_cache.dtype == qkv.dtype
            and k_cache.is_contiguous() and v_cache.is_contiguous()
            and cos.dtype == sin.dtype == torch.float32 and cos.is_contiguous()
            and sin.is_contiguous() and cos.shape == sin.shape and cos.shape[-1] == head_dim
            and positions.dtype == slot_mapping.dtype == torch.int64
            and positions.is_contiguous() and slot_mapping.is_contiguous()
            and positions.shape == slot_mapping.shape == (qkv.shape[0],)
            and _cpu_kernel_dtypes(qkv, k_cache, v_cache, cos, sin, positions,
                                   slot_mapping)):  # fmt: skip
        raise _layout_error("rope_and_cache", "CPU qkv [T, (Hq + 2 Hkv) D] with unit-stride "
                            "rows, caches of its dtype, float32 cos/sin, int64 positions and "
                            "slot_mapping [T]")  # fmt: skip
    tokens = qkv.shape[0]
    q = torch.empty(tokens, num_heads, head_dim, dtype=qkv.dtype)
    num_slots = k_cache.numel() // (num_kv_heads * head_dim)
    rc = layers_library().rope_and_cache(
        qkv.data_ptr(), qkv.stride(0), positions.data_ptr(), cos.data_ptr(), sin.data_ptr(),
        cos.shape[0], q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
        slot_mapping.data_ptr(), num_slots, tokens, num_heads, num_kv_heads, head_dim,
        DTYPES[qkv.dtype], torch.get_num_threads(), openmp_parallel(),
    )  # fmt: skip
    raise_rope_error(rc, cos.shape[0], num_slots)
    _check(rc, "rope_and_cache")
    return q


def raise_rope_error(rc: int, max_positions: int, num_slots: int) -> None:
    """Raise what a rope_and_cache return code means, where it is an error of the input."""
    if rc == 2:
        raise IndexError(f"positions past the rotary table ({max_positions}) or slots past the "
                         f"KV cache ({num_slots})")  # fmt: skip


def argmax(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(dim=-1) of a 2-D tensor (int64; a NaN wins, the first of equal maxima wins, as
    torch's). Reads bfloat16 and float16 as they are: their float32 values are exact, so the
    answer is the same. Rows apart in memory are copied together first."""
    if x.dim() != 2 or x.shape[1] == 0 or not x.is_floating_point() or not _cpu_kernel_dtypes(x):
        raise _layout_error("argmax", "CPU floating logits [N, V] with V > 0")
    if x.stride(1) != 1:
        x = x.contiguous()
    out = torch.empty(x.shape[0], dtype=torch.int64)
    rc = layers_library().argmax_rows(x.data_ptr(), x.stride(0), out.data_ptr(), x.shape[0],
                                      x.shape[1], DTYPES[x.dtype], torch.get_num_threads(),
                                      openmp_parallel())  # fmt: skip
    _check(rc, "argmax")
    return out


def encoder_attention(qkv: torch.Tensor, starts: torch.Tensor, num_heads: int,
                      scale: float) -> torch.Tensor:
    """Bidirectional attention of packed sequences: sequence b is rows [starts[b],
    starts[b + 1]) of qkv [T, 3 * num_heads * D] (q, k, v heads in that order, unit-stride
    rows) and attends to all its own rows; returns [T, num_heads * D] in qkv's dtype."""
    tokens, width = qkv.shape if qkv.dim() == 2 else (0, 0)
    if not (qkv.dim() == 2 and qkv.stride(1) == 1 and width % (3 * num_heads) == 0
            and starts.dtype == torch.int64 and starts.dim() == 1 and starts.is_contiguous()
            and starts.shape[0] >= 1 and int(starts[0]) == 0 and int(starts[-1]) == tokens
            and _cpu_kernel_dtypes(qkv, starts)):  # fmt: skip
        raise _layout_error("encoder_attention", "CPU qkv [T, 3 H D] with unit-stride rows and "
                            "int64 starts [B + 1] from 0 to T")  # fmt: skip
    head_dim = width // (3 * num_heads)
    out = torch.empty(tokens, num_heads * head_dim, dtype=qkv.dtype)
    rc = encoder_library().encoder_attention(
        qkv.data_ptr(), qkv.stride(0), starts.data_ptr(), starts.shape[0] - 1, num_heads,
        head_dim, DTYPES[qkv.dtype], scale, out.data_ptr(), out.stride(0),
        torch.get_num_threads(), openmp_parallel(),
    )  # fmt: skip
    if rc == _NO_MEMORY:
        raise MemoryError("encoder_attention: no memory for its scratch")
    _check(rc, "encoder_attention")
    return out


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                   bias: torch.Tensor, eps: float) -> torch.Tensor:
    """F.layer_norm(x + residual) (or of x alone) for x [T, H] with unit-stride rows, weight
    and bias [H] of x's dtype, in one pass."""
    if not (x.dim() == 2 and x.stride(1) == 1 and weight.shape == bias.shape == (x.shape[1],)
            and weight.is_contiguous() and bias.is_contiguous()
            and weight.dtype == bias.dtype == x.dtype and _cpu_kernel_dtypes(x)
            and (residual is None or (residual.shape == x.shape and residual.dtype == x.dtype
                                      and residual.stride(1) == 1))):  # fmt: skip
        raise _layout_error("add_layer_norm", "CPU x [T, H] with unit-stride rows, weight and "
                            "bias [H] of its dtype, residual like x")  # fmt: skip
    rows, hidden = x.shape
    out = torch.empty(rows, hidden, dtype=x.dtype)
    rc = encoder_library().add_layer_norm(
        x.data_ptr(), x.stride(0), _ptr(residual), 0 if residual is None else residual.stride(0),
        weight.data_ptr(), bias.data_ptr(), out.data_ptr(), hidden, rows, hidden,
        DTYPES[x.dtype], eps, torch.get_num_threads(), openmp_parallel(),
    )  # fmt: skip
    _check(rc, "add_layer_norm")
    return out


def pack_bf16_linear(weight: torch.Tensor) -> torch.Tensor | None:
    """A bfloat16 weight [N, K] (K even, unit-stride rows) packed for `linear_bf16`, or None
    where this machine or build has no kernel for it (the caller packs for oneDNN, at load)."""
    if weight.dim() == 2 and weight.shape[1] % 2 != 0:  # the kernel takes k in pairs
        return None
    return _pack_linear(weight, torch.bfloat16, "bf16", linear_library())


def linear_bf16(x: torch.Tensor, packed: torch.Tensor, n: int, bias: torch.Tensor | None
                ) -> torch.Tensor:
    """x [M, K] (bfloat16, unit-stride rows) times a `pack_bf16_linear` weight of n outputs,
    plus `bias` (bfloat16, padded with zeros to a multiple of 64) or None: [M, n] bfloat16,
    float32 sums rounded once."""
    return _linear(x, packed, n, bias, torch.bfloat16, "bf16", linear_library())


def pack_f32_linear(weight: torch.Tensor) -> torch.Tensor | None:
    """A float32 weight [N, K] (unit-stride rows) packed for `linear_f32`, or None where this
    build has no kernel for it."""
    return _pack_linear(weight, torch.float32, "f32", linear_f32_library())


def linear_f32(x: torch.Tensor, packed: torch.Tensor, n: int, bias: torch.Tensor | None
               ) -> torch.Tensor:
    """x [M, K] (float32, unit-stride rows) times a `pack_f32_linear` weight of n outputs, plus
    `bias` (float32, padded with zeros to a multiple of 64) or None: [M, n] float32, each sum
    in k order."""
    return _linear(x, packed, n, bias, torch.float32, "f32", linear_f32_library())


def _pack_linear(weight: torch.Tensor, dtype: torch.dtype, suffix: str, lib
                 ) -> torch.Tensor | None:
    """The shared body of the pack_*_linear wrappers: the library's `pack_<suffix>` over a
    [N, K] weight of `dtype` with unit-stride rows, or None where it cannot serve."""
    if not (weight.dtype == dtype and weight.device.type == "cpu" and weight.dim() == 2
            and weight.stride(1) == 1 and weight.numel() > 0) or lib is None:  # fmt: skip
        return None
    n, k = weight.shape
    packed = torch.empty(getattr(lib, f"linear_{suffix}_packed_elems")(n, k), dtype=dtype)
    if getattr(lib, f"pack_{suffix}")(weight.data_ptr(), weight.stride(0), n, k,
                                      packed.data_ptr()) != _OK:  # fmt: skip
        return None
    return packed


def _linear(x: torch.Tensor, packed: torch.Tensor, n: int, bias: torch.Tensor | None,
            dtype: torch.dtype, suffix: str, lib) -> torch.Tensor:
    """The shared body of linear_bf16 / linear_f32: the library's `linear_<suffix>`."""
    name = f"linear_{suffix}"
    if x.dtype != dtype or x.dim() != 2 or x.stride(1) != 1 or x.device.type != "cpu":
        dtype_name = str(dtype).removeprefix("torch.")
        raise ValueError(f"{name}: {dtype_name} input [M, K] with unit-stride rows expected "
                         f"on the CPU, got {x.dtype} on {x.device}")  # fmt: skip
    m, k = x.shape
    if packed.numel() != getattr(lib, f"{name}_packed_elems")(n, k):  # not a weight of [n, k]
        raise ValueError(f"{name}: x has {k} columns; the packed weight does not")
    out = torch.empty(m, n, dtype=dtype)
    rc = getattr(lib, name)(x.data_ptr(), x.stride(0), m, k, packed.data_ptr(), n, _ptr(bias),
                            out.data_ptr(), n, torch.get_num_threads(), openmp_parallel())  # fmt: skip
    _check(rc, name)
    return out


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()
