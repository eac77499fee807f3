"""Which implementation serves each op, chosen once at start (`EngineConfig.compute_backend`).

Three families:
- "triton": Triton kernels on CUDA devices (`ops/triton/`): fused norms, rotary and
  SiLU-and-mul, paged attention, the fused decode attention and batch-1 GEMVs;
- "native": soberana's C kernels on CPUs (`ops/cpu/`, built for `EngineConfig.cpu_isa`):
  norms, rotary + KV write, paged attention, argmax; bf16 linears on soberana's kernel where
  the CPU has AVX512_BF16 (else oneDNN's, packed once); the decoder stack in one native call;
- "torch": the portable PyTorch path, the reference the kernels are tested against.
"auto" takes "triton" on CUDA devices and "native" on CPUs. Every slower path taken (a missing
Triton, a failed kernel build, a CPU without AVX512_BF16, an FP8 KV cache) is logged once at
start as a warning with its reason; the choice is reported in ModelInfo and `/v1/models`.

The model's layers hold the chosen functions (`Kernels`); nothing here is looked up per call.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch
from torch import nn

from soberana.ops import attention as torch_attention
from soberana.ops import encoder as encoder_ops
from soberana.ops import layers as torch_layers

log = logging.getLogger("soberana.ops")

COMPUTE_BACKENDS = ("auto", "torch", "native", "triton")


def _torch_argmax(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1)


@dataclass(frozen=True)
class Kernels:
    """The functions a model's layers call, chosen once (see `select_backend`).

    The optional ones exist in one family only; None means the layer has no such step (it is
    decided here, at start, not per call).
    """

    rms_norm: Callable  # (x [T, H], weight, eps) -> norm(x)
    add_rms_norm: Callable  # (x, residual, weight, eps) -> (norm(x + residual), x + residual)
    head_rms_norm: Callable  # per-head q/k norms of [T, heads, D] views (Qwen3)
    rotary_embedding: Callable  # (positions, q, k, cos, sin) -> (q, k), new tensors
    silu_and_mul: Callable  # gate_up [T, 2I] -> [T, I]
    write_kv: Callable  # (k, v, k_cache, v_cache, slot_mapping)
    paged_attention: Callable  # (q, k, v, k_cache, v_cache, meta, scale) -> [T, Hq, D]
    argmax: Callable = _torch_argmax  # greedy sampling: logits [N, V] -> [N] int64
    # Native CPU: rotary embedding and the KV write in one call (layers without q/k norms):
    # (qkv, positions, cos, sin, k_cache, v_cache, slot_mapping, num_heads) -> q [T, Hq, D].
    rope_and_cache: Callable | None = None
    # Triton: per-head norm, rotary, KV write and attention of decode steps in one kernel.
    fused_decode_attention: Callable | None = None
    fused_decode_max_batch: int = 0
    # Triton: linears of up to `gemv_max_rows` rows (decode at small batches, speculative
    # verification) with the norm before / SiLU-and-mul after them fused in.
    gemv: Callable | None = None
    gemv_max_rows: int = 0
    # Native CPU: builds a model's decoder stack run in one native call (None: not served).
    decoder_stack: Callable[[nn.Module], Callable | None] | None = None
    # CPU linears packed once at load (soberana's bf16 kernel where the CPU has AVX512_BF16,
    # else oneDNN's), instead of F.linear.
    pack_cpu_linears: bool = False
    # Native CPU: the int8 linear kernels of this CPU and build, "w8a8" and/or "w8a16"
    # (ops/cpu/linear_int8.Int8Kernel); quantized layers choose among them at load.
    int8_linears: Mapping[str, Any] = field(default_factory=dict)
    # Triton: the quantized GEMM module (ops/triton/quant_gemm.py) for int8/int4 layers.
    quant_gemm: ModuleType | None = None
    # Encoders (BERT, XLM-R) over packed batches: (qkv [T, 3HD], PackedSeqs, heads, scale) ->
    # [T, HD], and (x, residual | None, weight, bias, eps) -> LayerNorm(x + residual).
    encoder_attention: Callable = encoder_ops.torch_encoder_attention
    add_layer_norm: Callable = encoder_ops.torch_add_layer_norm


TORCH_KERNELS = Kernels(
    rms_norm=torch_layers.torch_rms_norm,
    add_rms_norm=torch_layers.torch_add_rms_norm,
    head_rms_norm=torch_layers.torch_rms_norm,
    rotary_embedding=torch_layers.torch_rotary_embedding,
    silu_and_mul=torch_layers.torch_silu_and_mul,
    write_kv=torch_attention.write_kv,
    paged_attention=torch_attention.paged_attention,
)


@dataclass(frozen=True)
class Backend:
    """The chosen family, the functions serving each op, and why (for the log and /v1/models)."""

    requested: str
    name: str  # "torch", "native" or "triton"
    kernels: Kernels
    # op -> what serves it, e.g. {"attention": "native AVX-512", "bf16 linears": "oneDNN"}
    implementations: dict[str, str] = field(default_factory=dict)
    fallbacks: list[str] = field(default_factory=list)  # slower paths taken, with reasons

    def describe(self) -> str:
        ops = "; ".join(f"{op} {impl}" for op, impl in self.implementations.items())
        return f"{self.name} ({ops})" if ops else self.name

    def report(self, model: nn.Module | None = None) -> dict:
        """What `/v1/models` shows of the choice, for `model` (which may not get the native
        decoder stack the backend offers: Qwen3's q/k norms, tensor parallelism)."""
        kernels = dict(self.implementations)
        stack = getattr(model, "stack", None)
        if "decoder stack" in kernels and model is not None and stack is None:
            kernels["decoder stack"] = "modules (this model is not served by it)"
        return {"compute_backend": self.name, "requested": self.requested, "kernels": kernels,
                "fallbacks": list(self.fallbacks)}  # fmt: skip


def select_backend(requested: str, device: torch.device, dtype: torch.dtype,
                   kv_cache_dtype: torch.dtype | None = None, cpu_isa: str = "native") -> Backend:  # fmt: skip
    """The implementations serving a model in `dtype` on `device` (KV cache in `kv_cache_dtype`,
    default the model's), logged once with the reason for every slower path taken.

    Raises ValueError for a backend this device cannot run at all, and RuntimeError when
    "triton" or "native" was asked for by name and cannot be built here.
    """
    if requested not in COMPUTE_BACKENDS:
        raise ValueError(f"compute_backend must be one of {', '.join(COMPUTE_BACKENDS)}; "
                         f"got {requested!r}")  # fmt: skip
    kv_cache_dtype = kv_cache_dtype or dtype
    if device.type == "cpu":
        from soberana.ops.cpu import kernels as cpu_kernels

        cpu_kernels.set_isa(cpu_isa)
    if requested == "auto":
        name = "triton" if device.type == "cuda" else "native" if device.type == "cpu" else "torch"
    else:
        name = requested
    if name == "triton":
        backend = _triton(requested, device, dtype, kv_cache_dtype)
    elif name == "native":
        if device.type != "cpu":
            raise ValueError(f"compute_backend native runs on CPUs; the device is {device}")
        backend = _native(requested, dtype, kv_cache_dtype, cpu_isa)
    else:
        backend = Backend(requested, "torch", TORCH_KERNELS, {"all ops": "PyTorch"})
    log.info("Compute backend: %s%s", backend.describe(),
             "" if requested == backend.name else f" (asked: {requested})")  # fmt: skip
    for why in backend.fallbacks:
        log.warning("Slower path: %s", why)
    return backend


def _torch_fallback(requested: str, why: str) -> Backend:
    return Backend(requested, "torch", TORCH_KERNELS, {"all ops": "PyTorch"}, [why])


def _triton(requested: str, device: torch.device, dtype: torch.dtype,
            kv_cache_dtype: torch.dtype) -> Backend:  # fmt: skip
    import os

    # Triton's own switch: its CPU interpreter runs the kernels on CPU tensors (tests only).
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"compute_backend triton needs a CUDA device; the device is {device}")
    # An FP8 cache (kv_cache_dtype fp8): the cache write rounds to e4m3 and the attention
    # kernels read it (compute capability >= 8.9, checked by the engine's worker).
    try:
        from soberana.ops.triton import attention as triton_attention
        from soberana.ops.triton import gemv as triton_gemv
        from soberana.ops.triton import layers as triton_layers
    except ImportError as e:  # no Triton, or one without the CUDA extras these kernels use
        why = f"Triton kernels unavailable ({type(e).__name__}: {e})"
        if requested == "triton":
            raise RuntimeError(f"compute_backend triton: {why}") from e
        return _torch_fallback(requested, f"{why}; attention, norms and rotary via PyTorch")
    from soberana.ops import triton_module

    kernels = Kernels(
        quant_gemm=triton_module("quant_gemm"),  # logs why where it cannot be imported
        rms_norm=triton_layers.rms_norm,
        add_rms_norm=triton_layers.fused_add_rms_norm,
        head_rms_norm=triton_layers.rms_norm,
        rotary_embedding=triton_layers.rotary_embedding,
        silu_and_mul=triton_layers.silu_and_mul,
        write_kv=triton_attention.reshape_and_cache,
        paged_attention=_triton_paged_attention(triton_attention.triton_paged_attention),
        fused_decode_attention=triton_attention.fused_decode_attention,
        fused_decode_max_batch=torch_attention.FUSED_DECODE_MAX_BATCH,
        gemv=triton_gemv.gemv,
        gemv_max_rows=triton_gemv.MAX_ROWS,
    )
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    encoder, encoder_impl = cuda_encoder_ops(dtype, capability)
    kernels = dataclasses.replace(kernels, **encoder)
    impls = {"attention": "Triton (fused decode up to batch "
                          f"{torch_attention.FUSED_DECODE_MAX_BATCH})",
             "norm/rotary/SiLU": "Triton",
             f"linears of <= {triton_gemv.MAX_ROWS} tokens": "Triton few-row GEMV",
             "linears": "cuBLAS",
             "encoder attention/LayerNorm": encoder_impl}  # fmt: skip
    return Backend(requested, "triton", kernels, impls)


def cuda_encoder_ops(dtype: torch.dtype,
                     capability: tuple[int, int] | None) -> tuple[dict[str, Callable], str]:  # fmt: skip
    """An encoder's attention on a GPU of compute `capability` (None: no CUDA device), and
    what serves it: FlashAttention's variable-length kernel over the packed rows where it runs
    (bf16/fp16, sm80+), else ({}) PyTorch SDPA over padded length groups; LayerNorm is
    PyTorch's either way."""
    if dtype in (torch.bfloat16, torch.float16) and capability is not None and capability >= (8, 0):
        return ({"encoder_attention": encoder_ops.flash_varlen_encoder_attention},
                "FlashAttention varlen (packed) / PyTorch")  # fmt: skip
    if capability is None:
        why = "no CUDA device"
    elif capability < (8, 0):
        why = f"sm{capability[0]}{capability[1]}"
    else:
        why = str(dtype).removeprefix("torch.")
    return {}, f"PyTorch SDPA over length groups ({why}: no FlashAttention varlen)"


def _triton_paged_attention(fn: Callable) -> Callable:
    def paged_attention(q, k, v, k_cache, v_cache, meta, scale):
        return fn(q, k_cache, v_cache, meta, scale)

    return paged_attention


def _native(requested: str, dtype: torch.dtype, kv_cache_dtype: torch.dtype,
            cpu_isa: str) -> Backend:  # fmt: skip
    from soberana.ops.cpu import decoder_stack, linear_int8
    from soberana.ops.cpu import kernels as cpu_kernels
    from soberana.ops.cpu import linear as cpu_linear

    attention_lib, layers_lib = cpu_kernels.attention_library(), cpu_kernels.layers_library()
    if attention_lib is None or layers_lib is None:
        why = f"native CPU kernels unavailable ({cpu_kernels.unavailable_reason()})"
        if requested == "native":
            raise RuntimeError(f"compute_backend native: {why}")
        return _torch_fallback(requested, f"{why}; all ops via PyTorch")
    fallbacks: list[str] = []
    simd = {2: "AVX-512", 1: "AVX2+FMA", 0: "portable C"}.get(attention_lib.simd_level(), "?")
    if simd == "portable C":
        fallbacks.append(f"cpu_isa {cpu_isa}: native kernels in portable C (no AVX2/AVX-512 "
                         "build)")  # fmt: skip
    if dtype not in cpu_kernels.DTYPES:
        why = f"dtype {dtype}: the native CPU kernels read float32, bfloat16 and float16"
        if requested == "native":
            raise ValueError(f"compute_backend native: {why}")
        return _torch_fallback(requested, f"{why}; all ops via PyTorch")
    native_kv = kv_cache_dtype == dtype
    if not native_kv:
        fallbacks.append("kv_cache_dtype fp8: rotary, KV write and attention via PyTorch (the "
                         "native attention kernel reads caches in the model dtype)")  # fmt: skip
    impls = {"attention": f"native {simd}" if native_kv else "PyTorch (FP8 cache)",
             "norm/rotary/SiLU/argmax": f"native {simd}"}
    stack = None
    no_bf16 = (f"cpu_isa {cpu_isa} (no AVX512_BF16 in the build)" if cpu_isa != "native"
               else "no AVX512_BF16 on this CPU")  # fmt: skip
    onednn = "oneDNN (packed once)" if cpu_linear.packable(dtype) else "PyTorch F.linear"
    if dtype == torch.bfloat16:
        linear = cpu_kernels.linear_library()
        if linear is not None:
            path = linear.linear_bf16_available()
            impls["bf16 linears"] = f"soberana {cpu_kernels.BF16_LINEAR_PATHS[path]}"
            if path != 1:
                fallbacks.append(f"{no_bf16}: bf16 linears on AVX2+FMA, bfloat16 widened to "
                                 "float32 in registers (dtype float32 is as fast here)")  # fmt: skip
        else:
            impls["bf16 linears"] = onednn
            fallbacks.append(f"no bf16 linear kernel in the cpu_isa {cpu_isa} build (it needs "
                             f"AVX512_BF16 or AVX2): bf16 linears via {onednn}, decoder layers "
                             "as modules unless quantized")  # fmt: skip
        # a model whose every projection has a native kernel (build_stack checks each)
        if native_kv and decoder_stack.forward_library() is not None:
            stack = decoder_stack.build_stack
            impls["decoder stack"] = "one native call per step"
    elif dtype == torch.float32:
        if cpu_kernels.linear_f32_library() is not None:
            impls["fp32 linears"] = f"soberana {simd}"
        else:
            impls["fp32 linears"] = onednn
            fallbacks.append(f"no float32 linear kernel in the cpu_isa {cpu_isa} build (it "
                             f"needs AVX-512 or AVX2): fp32 linears via {onednn}")  # fmt: skip
    else:
        impls["linears"] = onednn
    int8_linears = linear_int8.int8_kernels()
    # (the kernel each quantized layer takes is logged at load and listed in /v1/models)
    if "w8a8" not in int8_linears:
        impls["int8 linears"] = (f"no W8A8 kernel in the cpu_isa {cpu_isa} build (it needs "
                                 "AVX512_VNNI or AVX2): int8 weight-only")  # fmt: skip
    encoder = _native_encoder_ops()
    impls["encoder attention/LayerNorm"] = (f"native {simd}" if encoder
                                            else f"PyTorch (no native kernel in the {simd} build)")
    kernels = Kernels(
        int8_linears=int8_linears,
        rms_norm=cpu_kernels.rms_norm,
        add_rms_norm=cpu_kernels.add_rms_norm,
        # per-head q/k norms read [T, heads, D] views of the fused projection, which the
        # row kernel cannot take without a copy
        head_rms_norm=torch_layers.torch_rms_norm,
        rotary_embedding=torch_layers.torch_rotary_embedding,
        silu_and_mul=cpu_kernels.silu_and_mul,
        write_kv=torch_attention.write_kv,
        paged_attention=(cpu_kernels.paged_attention_step if native_kv
                         else torch_attention.paged_attention),  # fmt: skip
        argmax=cpu_kernels.argmax,
        rope_and_cache=cpu_kernels.rope_and_cache if native_kv else None,
        decoder_stack=stack,
        pack_cpu_linears=True,
        **encoder,
    )
    return Backend(requested, "native", kernels, impls, fallbacks)


def default_kernels(device: torch.device, dtype: torch.dtype) -> Kernels:
    """The kernels "auto" chooses for `device` and `dtype`, the native ones built for the
    current ISA (a quantized layer finalized outside an engine: tests, benchmarks)."""
    from soberana.ops.cpu import kernels as cpu_kernels

    isa = cpu_kernels.current_isa() if device.type == "cpu" else "native"
    return select_backend("auto", device, dtype, cpu_isa=isa).kernels


def _native_encoder_ops() -> dict[str, Callable]:
    """The encoder's native attention and add + LayerNorm where they are vectorised (AVX-512
    and AVX2 + FMA builds; the plain-C loops are slower than PyTorch's), else {}: PyTorch's. Encoders only,
    so not a fallback of a decoder's backend: the pooling core reports it."""
    from soberana.ops.cpu import kernels as cpu_kernels

    lib = cpu_kernels.encoder_library()
    if lib is None or not lib.encoder_attention_simd():
        return {}
    return {"encoder_attention": encoder_ops.native_encoder_attention,
            "add_layer_norm": cpu_kernels.add_layer_norm}


def with_kernels(kernels: Kernels, **changes) -> Kernels:
    """`kernels` with some functions replaced (tests and benchmarks comparing two paths)."""
    return dataclasses.replace(kernels, **changes)
