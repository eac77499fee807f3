"""`QuantLinear`: an `nn.Linear` whose weight is stored quantized, and the linear methods that
fill and apply it (vLLM's `LinearMethod`: create the weights, load them, apply them).

Each method owns one weight format (`schemes.py`) and picks its kernel once, at load, among
those the compute backend chose (`ops/backend.py`'s `Kernels`, `LinearMethod.choose_kernel`):
the model code calls `layer(x)` and never branches on the format.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from soberana.quantization import schemes

if TYPE_CHECKING:
    from soberana.ops.backend import Kernels


class LinearMethod:
    """How one weight format is stored, filled shard by shard, and multiplied."""

    name = ""
    # One scale per output row over all its inputs (int8, fp8): a row-parallel shard (split
    # along the inputs) needs the whole row to compute it. False where scales are per group.
    per_row_scales = True

    def create_weights(self, layer: QuantLinear, dtype: torch.dtype) -> None:
        raise NotImplementedError

    def quantize_rows(self, w: torch.Tensor, row_amax: torch.Tensor | None = None
                      ) -> dict[str, torch.Tensor]:  # fmt: skip
        """The quantized tensors of rows `w` [n, K], keyed by the layer's buffer names. With
        `per_row_scales`, `row_amax` [n] is each row's largest |value| over all its inputs
        where `w` holds only some of them (a row-parallel shard); None: `w` is whole rows."""
        raise NotImplementedError

    def dequantize(self, layer: QuantLinear) -> torch.Tensor:
        """float32 [N, K]: the weight the layer multiplies by (the tests' reference)."""
        raise NotImplementedError

    def slice_inputs(self, parts: dict[str, torch.Tensor], start: int, length: int
                     ) -> dict[str, torch.Tensor]:  # fmt: skip
        """Quantized whole rows `parts` restricted to inputs start:start+length (a
        row-parallel shard): the weight's columns, per-row scales whole."""
        return {name: t[:, start:start + length] if name == "weight" else t
                for name, t in parts.items()}  # fmt: skip

    def choose_kernel(self, layer: QuantLinear, kernels: Kernels) -> str:
        """Choose, once, the kernel that serves `layer` among the compute backend's `kernels`
        (re-laying its weights for it where it needs: vLLM's process_weights_after_loading),
        and name it (logged, and shown in /v1/models)."""
        raise NotImplementedError

    def apply(self, layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def stack_linear(self, layer: QuantLinear) -> tuple[int, int, int | None] | None:
        """(C function, weight, bias) addresses through which the native decoder stack runs
        this layer on bfloat16 rows (ops/csrc/cpu_forward.h's LinearFn), or None: it cannot."""
        return None

    def embedding(self, layer: QuantLinear, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of the dequantized weight in the activation dtype: a tied model's token
        embedding, read from its quantized output head."""
        raise NotImplementedError(f"{self.name} does not serve a tied embedding")


class QuantLinear(nn.Module):
    """`x @ W.T + bias` with W quantized by `method`; rows are loaded with `weight_loader`."""

    def __init__(self, in_features: int, out_features: int, bias: bool,
                 method: LinearMethod, dtype: torch.dtype | None = None) -> None:  # fmt: skip
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.method = method
        dtype = dtype or torch.get_default_dtype()
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype)) if bias else None
        method.create_weights(self, dtype)
        self.kernel = ""  # set by `finalize` once the weights are on their device

    def weight_loader(self, w: torch.Tensor, begin: int = 0) -> None:
        """Quantize the float rows `w` [n, K] into rows begin:begin+n (one shard of a fused
        projection, or the whole matrix): only this shard is ever held in float."""
        if w.dim() != 2 or w.shape[1] != self.in_features or begin + w.shape[0] > self.out_features:
            raise ValueError(f"weight rows {tuple(w.shape)} at row {begin} do not fit a "
                             f"[{self.out_features}, {self.in_features}] linear")  # fmt: skip
        parts = self.method.quantize_rows(w.to(self._buffer_device()))
        self.load_quantized(parts, begin)

    def load_quantized(self, parts: dict[str, torch.Tensor], begin: int = 0) -> None:
        """Copy already-quantized rows (this layer's own layout) into rows begin:."""
        with torch.no_grad():
            for name, t in parts.items():
                buf = getattr(self, name)
                dst = buf[begin:begin + t.shape[0]]
                if dst.shape != t.shape:
                    raise ValueError(f"{name}: rows of shape {tuple(t.shape)} do not fit "
                                     f"{tuple(buf.shape)} at row {begin}")  # fmt: skip
                dst.copy_(t.to(buf.dtype))

    def finalize(self, kernels: Kernels | None = None) -> None:
        """Called once every row is loaded: the kernel is chosen among the compute backend's
        `kernels` (None: those `select_backend("auto")` gives this device) and the weights
        re-laid for it."""
        if kernels is None:
            from soberana.ops.backend import default_kernels

            kernels = default_kernels(self._buffer_device(), self._activation_dtype())
        self.kernel = self.method.choose_kernel(self, kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x)

    def stack_linear(self) -> tuple[int, int, int | None] | None:
        """See LinearMethod.stack_linear (the native decoder stack asks each linear)."""
        return self.method.stack_linear(self)

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """See LinearMethod.embedding (a tied model's lookup, where this layer is its head)."""
        return self.method.embedding(self, ids)

    def _buffer_device(self) -> torch.device:
        return next(iter(self.buffers())).device

    def _activation_dtype(self) -> torch.dtype:
        return self.bias.dtype if self.bias is not None else self.weight_scale.dtype

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"{self.method.name}, kernel={self.kernel or '?'}")  # fmt: skip


# PyTorch's CPU int8 kernel is a GEMV: it streams the weight once per row block, fine for a
# few rows, minutes for a prefill of thousands (measured on the 2-core Zen 4 host). It serves
# only where soberana's own kernels (ops/cpu/linear_int8.py) are unavailable.
CPU_INT8_GEMV_ROWS = 16
INT8_ACTIVATIONS = ("dynamic", "none")


class Int8LinearMethod(LinearMethod):
    """int8 weights, per-output-channel symmetric scales.

    `activations="dynamic"` (`--quantization int8`): on CPUs with soberana's W8A8 kernel
    (AVX512_VNNI or AVX2) the activations are quantized to int8 per block of 32 inputs as well
    and the products summed in int32 (W8A8, as llama.cpp's Q8_0 x Q8_0); on GPUs, steps of
    more tokens than the GEMV takes quantize them per group of 128 inputs and multiply on the
    int8 tensor cores (ops/triton/quant_gemm.py), steps the GEMV takes run weight-only (it
    streams the weight once, where the activations' precision would buy nothing); elsewhere
    weight-only. `activations="none"` (`--quantization int8_w8a16`, compressed-tensors W8A16
    checkpoints): weight-only everywhere, `x @ dequantize(W).T` up to the order of the float
    sums. On a CPU the weight is re-laid at load into the chosen kernel's blob
    (`layer.native`), which replaces the row-major `weight` (set to None)."""

    def __init__(self, activations: str = "dynamic") -> None:
        if activations not in INT8_ACTIVATIONS:
            raise ValueError(f"int8 activations must be one of {INT8_ACTIVATIONS}; "
                             f"got {activations!r}")  # fmt: skip
        self.activations = activations
        self.name = ("int8 (per-channel weights; W8A8 with int8 activations per block of 32 on CPUs "
                     "with the int8 dot-product kernel, per 128 on GPUs for batched steps; "
                     "W8A16 elsewhere)"
                     if activations == "dynamic" else "int8 (W8A16, per-channel)")  # fmt: skip

    def create_weights(self, layer: QuantLinear, dtype: torch.dtype) -> None:
        n, k = layer.out_features, layer.in_features
        layer.register_buffer("weight", torch.empty(n, k, dtype=torch.int8))
        # scales in the activation dtype: the CPU op and the Triton kernels read them so
        layer.register_buffer("weight_scale", torch.empty(n, dtype=dtype))
        layer.native = None  # the CPU kernel's blob
        layer.cpu_kernel = None  # the Int8Kernel (ops/cpu/linear_int8.py) that reads it
        layer.native_bias = None  # the bias as that kernel reads it
        layer.triton = None  # the Triton quant_gemm module (CUDA)
        layer.act_group = 0  # CUDA W8A8: inputs per activation scale (0: weight-only)

    def quantize_rows(self, w: torch.Tensor, row_amax: torch.Tensor | None = None
                      ) -> dict[str, torch.Tensor]:  # fmt: skip
        q, scale = schemes.quantize_int8(w, row_amax)
        return {"weight": q, "weight_scale": scale}

    def quantized(self, layer: QuantLinear) -> tuple[torch.Tensor, torch.Tensor]:
        """(q int8 [N, K], scale [N]) as loaded, wherever the kernel keeps them."""
        if layer.native is not None:
            q, _ = layer.cpu_kernel.unpack(layer.native, layer.out_features, layer.in_features)
            return q, layer.weight_scale
        return layer.weight, layer.weight_scale

    def dequantize(self, layer: QuantLinear) -> torch.Tensor:
        return schemes.dequantize_int8(*self.quantized(layer))

    def embedding(self, layer: QuantLinear, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.reshape(-1)
        if layer.native is not None:
            q = layer.cpu_kernel.rows(layer.native, layer.out_features, layer.in_features, ids)
        else:
            q = layer.weight[ids]
        return (q.float() * layer.weight_scale[ids].float()[:, None]).to(layer.weight_scale.dtype)

    def w8a8(self, layer: QuantLinear) -> bool:
        """Whether `layer` quantizes its activations (the W8A8 CPU kernel serves it)."""
        return layer.cpu_kernel is not None and layer.cpu_kernel.activations.endswith("(W8A8)")

    def choose_kernel(self, layer: QuantLinear, kernels: Kernels) -> str:
        device = layer.weight.device
        if device.type == "cuda":
            layer.triton = kernels.quant_gemm
            if layer.triton is None:
                return "torch dequantize + matmul"
            k = layer.in_features
            if self.activations == "dynamic" and k % 16 == 0:
                layer.act_group = schemes.group_size_for(k, schemes.INT8_GPU_ACTIVATION_GROUP)
                return (f"Triton int8 GEMV (W8A16, few tokens); Triton int8 W8A8 GEMM (batched: "
                        f"activations int8 per token per {layer.act_group} inputs)")
            return "Triton int8 GEMV (few tokens) / Triton int8 GEMM (W8A16)"
        dtype = layer.weight_scale.dtype
        order = ("w8a8", "w8a16") if self.activations == "dynamic" else ("w8a16",)
        for name in order:
            kernel = kernels.int8_linears.get(name)
            blob = kernel.pack(layer.weight, layer.weight_scale) if (
                kernel is not None and kernel.serves(dtype)) else None  # fmt: skip
            if blob is not None:
                layer.native, layer.cpu_kernel = blob, kernel
                layer.native_bias = kernel.prepare_bias(layer.bias, dtype)
                layer.weight = None  # the blob holds the same bytes
                return kernel.name
        return (f"aten._weight_int8pack_mm (CPU, <= {CPU_INT8_GEMV_ROWS} rows); "
                "dequantize + matmul (more rows)")  # fmt: skip

    def apply(self, layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, layer.in_features)
        if layer.cpu_kernel is not None:  # packed at load: a CPU layer this build serves
            out = layer.cpu_kernel.linear(rows, layer.native, layer.out_features,
                                          layer.native_bias)  # fmt: skip
            return out.view(*x.shape[:-1], layer.out_features)
        if layer.act_group:  # CUDA W8A8, bias added in the kernel
            out = layer.triton.int8_w8a8_matmul(rows, layer.weight, layer.weight_scale,
                                                layer.act_group, layer.bias)  # fmt: skip
            return out.view(*x.shape[:-1], layer.out_features)
        if x.device.type == "cpu" and rows.shape[0] <= CPU_INT8_GEMV_ROWS:
            out = torch.ops.aten._weight_int8pack_mm(rows, layer.weight, layer.weight_scale)
        elif x.device.type == "cpu":
            out = F.linear(rows, layer.weight.to(x.dtype)).mul_(layer.weight_scale)
        elif layer.triton is not None:
            out = layer.triton.int8_matmul(rows, layer.weight, layer.weight_scale)
        else:
            out = F.linear(rows, layer.weight.to(x.dtype)) * layer.weight_scale
        if layer.bias is not None:
            out = out + layer.bias
        return out.view(*x.shape[:-1], layer.out_features)

    def stack_linear(self, layer: QuantLinear) -> tuple[int, int, int | None] | None:
        kernel = layer.cpu_kernel
        if kernel is None or not kernel.stack_function or layer.weight_scale.dtype != torch.bfloat16:
            return None
        bias = layer.native_bias
        return kernel.stack_function, layer.native.data_ptr(), (
            None if bias is None else bias.data_ptr())  # fmt: skip


def w8a8_gelu_mlp(up: nn.Module, down: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """`down(gelu(up(x)))` (exact GELU) as one fused call where both layers run the W8A8 CPU
    kernel and this build fuses GELU and the down layer's activation quantization into the up
    layer's last step (`ops/cpu/linear_int8.w8a8_gelu_mlp`); else None. Asked once, at load."""
    from soberana.ops.cpu import linear_int8

    if not all(isinstance(m, QuantLinear) and isinstance(m.method, Int8LinearMethod)
               and m.method.w8a8(m) for m in (up, down)):  # fmt: skip
        return None
    if up.out_features % linear_int8.PANEL != 0 or not linear_int8.w8a8_gelu_mlp_available():
        return None
    return functools.partial(_fused_mlp, up, down)


def _fused_mlp(up: QuantLinear, down: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    from soberana.ops.cpu import linear_int8

    rows = x.reshape(-1, up.in_features)
    out = linear_int8.w8a8_gelu_mlp(rows, up.native, up.native_bias, up.out_features,
                                    down.native, down.native_bias, down.out_features)  # fmt: skip
    return out.view(*x.shape[:-1], down.out_features)


class Int4LinearMethod(LinearMethod):
    """Weight-only int4, group-wise asymmetric (scale and zero point per `group_size` inputs),
    two values per byte."""

    def __init__(self, group_size: int = schemes.INT4_GROUP_SIZE, float_zero: bool = False) -> None:
        self.group_size = group_size
        # Zero points in the activation dtype instead of uint8 (HQQ-style): GGUF Q4_K / Q4_1
        # groups keep their codes with a fractional zero point. The kernels widen either.
        self.float_zero = float_zero
        zero = ", float zero points" if float_zero else ""
        self.name = f"int4 (W4A16, group {group_size}, asymmetric{zero})"

    per_row_scales = False  # a scale and a zero point per group of inputs

    def create_weights(self, layer: QuantLinear, dtype: torch.dtype) -> None:
        n, k = layer.out_features, layer.in_features
        layer.group_size = schemes.group_size_for(k, self.group_size)
        groups = k // layer.group_size
        layer.register_buffer("weight", torch.empty(n, k // 2, dtype=torch.uint8))
        layer.register_buffer("weight_scale", torch.empty(n, groups, dtype=dtype))
        layer.register_buffer("weight_zero", torch.empty(
            n, groups, dtype=dtype if self.float_zero else torch.uint8))  # fmt: skip
        layer.triton = None  # the Triton quant_gemm module (CUDA)

    def quantize_rows(self, w: torch.Tensor, row_amax: torch.Tensor | None = None
                      ) -> dict[str, torch.Tensor]:  # fmt: skip
        if row_amax is not None:
            raise ValueError("int4 scales are per group: quantize whole groups, without row_amax")
        group = schemes.group_size_for(w.shape[1], self.group_size)
        packed, scale, zero = schemes.quantize_int4(w, group)
        return {"weight": packed, "weight_scale": scale, "weight_zero": zero}

    def dequantize(self, layer: QuantLinear) -> torch.Tensor:
        return schemes.dequantize_int4(layer.weight, layer.weight_scale, layer.weight_zero)

    def slice_inputs(self, parts: dict[str, torch.Tensor], start: int, length: int
                     ) -> dict[str, torch.Tensor]:  # fmt: skip
        """Whole groups only: ValueError where start or length would cut one (or a byte)."""
        k = parts["weight"].shape[1] * 2
        group = k // parts["weight_scale"].shape[1]
        if start % group or length % group:
            raise ValueError(f"int4 inputs {start}:{start + length} cut the groups of {group}")
        g0, g1 = start // group, (start + length) // group
        return {"weight": parts["weight"][:, start // 2:(start + length) // 2],
                "weight_scale": parts["weight_scale"][:, g0:g1],
                "weight_zero": parts["weight_zero"][:, g0:g1]}

    def choose_kernel(self, layer: QuantLinear, kernels: Kernels) -> str:
        layer.triton = kernels.quant_gemm if layer.weight.device.type == "cuda" else None
        if layer.triton is not None:
            return "triton int4 GEMV (1 token) / Triton int4 GEMM"
        return "torch dequantize + matmul (CPU: correctness path, no int4 kernel)"

    def apply(self, layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, layer.in_features)
        if layer.triton is not None:
            out = layer.triton.int4_matmul(rows, layer.weight, layer.weight_scale,
                                           layer.weight_zero, layer.group_size)  # fmt: skip
        else:
            out = F.linear(rows, self.dequantize(layer).to(x.dtype))
        if layer.bias is not None:
            out = out + layer.bias
        return out.view(*x.shape[:-1], layer.out_features)


def fp8_gemm_supported(device: torch.device) -> bool:
    """FP8 matrix units: NVIDIA compute capability >= 8.9 (Ada, Hopper, Blackwell)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


class Fp8LinearMethod(LinearMethod):
    """float8_e4m3fn weights with per-channel scales. W8A8 on GPUs with FP8 matrix units
    (activations quantized per token at run time, `torch._scaled_mm`); weight-only elsewhere
    (the weight dequantized to the activation dtype)."""

    name = "fp8 (e4m3, per-channel weights, per-token dynamic activations)"

    def create_weights(self, layer: QuantLinear, dtype: torch.dtype) -> None:
        n, k = layer.out_features, layer.in_features
        layer.register_buffer("weight", torch.empty(n, k, dtype=torch.float8_e4m3fn))
        layer.register_buffer("weight_scale", torch.empty(n, dtype=torch.float32))
        layer.w8a8 = False  # FP8 matrix units: activations quantized per token
        # (rows) -> (fp8 rows, float32 scales [M, 1]): the Triton kernel, or PyTorch's chain
        layer.quantize_tokens = schemes.quantize_fp8_per_token

    def quantize_rows(self, w: torch.Tensor, row_amax: torch.Tensor | None = None
                      ) -> dict[str, torch.Tensor]:  # fmt: skip
        q, scale = schemes.quantize_fp8(w, row_amax)
        return {"weight": q, "weight_scale": scale}

    def dequantize(self, layer: QuantLinear) -> torch.Tensor:
        return schemes.dequantize_fp8(layer.weight, layer.weight_scale)

    def choose_kernel(self, layer: QuantLinear, kernels: Kernels) -> str:
        layer.w8a8 = fp8_gemm_supported(layer.weight.device)
        if layer.w8a8 and kernels.quant_gemm is not None:
            layer.quantize_tokens = functools.partial(kernels.quant_gemm.per_token_quant,
                                                      dtype=torch.float8_e4m3fn)  # fmt: skip
            return ("torch._scaled_mm W8A8 (rowwise scales, activations quantized by one "
                    "Triton kernel); Triton fp8 GEMV (few tokens)")
        if layer.w8a8:
            return "torch._scaled_mm W8A8 (rowwise scales); Triton fp8 GEMV (few tokens)"
        return "weight-only fp8: dequantize to the activation dtype + matmul"

    def apply(self, layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, layer.in_features)
        if layer.w8a8:
            xq, x_scale = layer.quantize_tokens(rows)
            out = torch._scaled_mm(xq, layer.weight.t(), scale_a=x_scale,
                                   scale_b=layer.weight_scale.view(1, -1),
                                   out_dtype=x.dtype)  # fmt: skip
        else:
            out = F.linear(rows, self.dequantize(layer).to(x.dtype))
        if layer.bias is not None:
            out = out + layer.bias
        return out.view(*x.shape[:-1], layer.out_features)
