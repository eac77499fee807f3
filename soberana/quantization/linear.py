"""`QuantLinear`: an `nn.Linear` whose weight is stored quantized, and the linear methods that
fill and apply it (vLLM's `LinearMethod`: create the weights, load them, apply them).

Each method owns one weight format (`schemes.py`) and picks its kernels once, at load, from
the device (`LinearMethod.kernel`): the model code calls `layer(x)` and never branches on
the format.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from soberana.quantization import schemes


class LinearMethod:
    """How one weight format is stored, filled shard by shard, and multiplied."""

    name = ""

    def create_weights(self, layer: QuantLinear, dtype: torch.dtype) -> None:
        raise NotImplementedError

    def quantize_rows(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """The quantized tensors of full rows `w` [n, K], keyed by the layer's buffer names."""
        raise NotImplementedError

    def dequantize(self, layer: QuantLinear) -> torch.Tensor:
        """float32 [N, K]: the weight the layer multiplies by (the tests' reference)."""
        raise NotImplementedError

    def choose_kernel(self, device: torch.device) -> str:
        """Which kernel serves this format on `device` (logged, and shown in /v1/models)."""
        raise NotImplementedError

    def process_weights_after_loading(self, layer: QuantLinear) -> None:
        """Re-lay the loaded weights for the kernel that serves them (vLLM's hook of this
        name); by default they stay as loaded."""

    def apply(self, layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


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

    def finalize(self) -> None:
        """Called once every row is loaded: the weights are re-laid for their kernel."""
        self.method.process_weights_after_loading(self)
        self.kernel = self.method.choose_kernel(self._buffer_device())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x)

    def _buffer_device(self) -> torch.device:
        return next(iter(self.buffers())).device

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"{self.method.name}, kernel={self.kernel or '?'}")  # fmt: skip


def _one_row_gemv(x: torch.Tensor) -> bool:
    from soberana.ops.layers import uses_gemv

    return uses_gemv(x)


def _triton_quant():
    from soberana.ops import triton_module

    return triton_module("triton_quant_gemm")


# PyTorch's CPU int8 kernel is a GEMV: it streams the weight once per row block, fine for a
# few rows, minutes for a prefill of thousands (measured on the 2-core Zen 4 host). It serves
# only where soberana's own kernel (cpu_int8.py) is unavailable.
CPU_INT8_GEMV_ROWS = 16


class Int8LinearMethod(LinearMethod):
    """Weight-only int8, per-output-channel symmetric scales.

    On CPUs with soberana's int8 kernel (csrc/linear_int8.c: AVX512_BF16, or AVX2 + FMA) the
    weight and its scales are re-laid at load into the kernel's blob (`layer.native`), which
    replaces the row-major `weight` (set to None): the layer holds its int8 bytes once."""

    name = "int8 (W8A16, per-channel)"

    def create_weights(self, layer: QuantLinear, dtype: torch.dtype) -> None:
        n, k = layer.out_features, layer.in_features
        layer.register_buffer("weight", torch.empty(n, k, dtype=torch.int8))
        # scales in the activation dtype: the CPU op and the Triton kernels read them so
        layer.register_buffer("weight_scale", torch.empty(n, dtype=dtype))
        layer.native = None

    def quantize_rows(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        q, scale = schemes.quantize_int8(w)
        return {"weight": q, "weight_scale": scale}

    def dequantize(self, layer: QuantLinear) -> torch.Tensor:
        if layer.native is not None:
            from soberana.quantization import cpu_int8

            q, _ = cpu_int8.unpack(layer.native, layer.out_features, layer.in_features)
            return schemes.dequantize_int8(q, layer.weight_scale)
        return schemes.dequantize_int8(layer.weight, layer.weight_scale)

    def process_weights_after_loading(self, layer: QuantLinear) -> None:
        if layer.weight is None or layer.weight.device.type != "cpu":
            return
        from soberana.quantization import cpu_int8

        blob = cpu_int8.pack(layer.weight, layer.weight_scale)
        if blob is None:
            return
        layer.native = blob
        layer.native_bias = {torch.bfloat16: cpu_int8.pad_bias(layer.bias, torch.bfloat16),
                             torch.float32: cpu_int8.pad_bias(layer.bias, torch.float32)}  # fmt: skip
        layer.weight = None  # the blob holds the same bytes

    def choose_kernel(self, device: torch.device) -> str:
        if device.type == "cuda":
            return "triton int8 GEMV (1 token) / Triton int8 GEMM" if _triton_quant() else (
                "torch dequantize + matmul")  # fmt: skip
        from soberana.quantization import cpu_int8

        return cpu_int8.kernel_name() or (
            f"aten._weight_int8pack_mm (CPU, <= {CPU_INT8_GEMV_ROWS} rows); "
            "dequantize + matmul (more rows)")  # fmt: skip

    def apply(self, layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, layer.in_features)
        if layer.native is not None and x.device.type == "cpu":
            from soberana.quantization import cpu_int8

            biases = layer.native_bias
            out = cpu_int8.linear(rows, layer.native, layer.out_features,
                                  biases[torch.bfloat16], biases[torch.float32])  # fmt: skip
            if out is not None:
                return out.view(*x.shape[:-1], layer.out_features)
            # a dtype the kernel does not take (float16): the weight from the blob
            out = F.linear(rows, self.dequantize(layer).to(x.dtype))
        elif x.device.type == "cpu" and rows.shape[0] <= CPU_INT8_GEMV_ROWS:
            out = torch.ops.aten._weight_int8pack_mm(rows, layer.weight, layer.weight_scale)
        elif x.device.type == "cpu":
            out = F.linear(rows, layer.weight.to(x.dtype)).mul_(layer.weight_scale)
        elif _triton_quant() is not None:
            out = _triton_quant().int8_matmul(rows, layer.weight, layer.weight_scale)
        else:
            out = F.linear(rows, layer.weight.to(x.dtype)) * layer.weight_scale
        if layer.bias is not None:
            out = out + layer.bias
        return out.view(*x.shape[:-1], layer.out_features)


class Int4LinearMethod(LinearMethod):
    """Weight-only int4, group-wise asymmetric (scale and zero point per `group_size` inputs),
    two values per byte."""

    def __init__(self, group_size: int = schemes.INT4_GROUP_SIZE) -> None:
        self.group_size = group_size
        self.name = f"int4 (W4A16, group {group_size}, asymmetric)"

    def create_weights(self, layer: QuantLinear, dtype: torch.dtype) -> None:
        n, k = layer.out_features, layer.in_features
        layer.group_size = schemes.int4_group_for(k, self.group_size)
        groups = k // layer.group_size
        layer.register_buffer("weight", torch.empty(n, k // 2, dtype=torch.uint8))
        layer.register_buffer("weight_scale", torch.empty(n, groups, dtype=dtype))
        layer.register_buffer("weight_zero", torch.empty(n, groups, dtype=torch.uint8))

    def quantize_rows(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        packed, scale, zero = schemes.quantize_int4(w, schemes.int4_group_for(w.shape[1],
                                                                              self.group_size))
        return {"weight": packed, "weight_scale": scale, "weight_zero": zero}

    def dequantize(self, layer: QuantLinear) -> torch.Tensor:
        return schemes.dequantize_int4(layer.weight, layer.weight_scale, layer.weight_zero)

    def choose_kernel(self, device: torch.device) -> str:
        if device.type == "cuda" and _triton_quant():
            return "triton int4 GEMV (1 token) / Triton int4 GEMM"
        return "torch dequantize + matmul (CPU: correctness path, no int4 kernel)"

    def apply(self, layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, layer.in_features)
        if x.device.type == "cuda" and _triton_quant() is not None:
            out = _triton_quant().int4_matmul(rows, layer.weight, layer.weight_scale,
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

    def quantize_rows(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        q, scale = schemes.quantize_fp8(w)
        return {"weight": q, "weight_scale": scale}

    def dequantize(self, layer: QuantLinear) -> torch.Tensor:
        return schemes.dequantize_fp8(layer.weight, layer.weight_scale)

    def choose_kernel(self, device: torch.device) -> str:
        if fp8_gemm_supported(device):
            return "torch._scaled_mm W8A8 (rowwise scales); Triton fp8 GEMV (1 token)"
        return "weight-only fp8: dequantize to the activation dtype + matmul"

    def apply(self, layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, layer.in_features)
        if fp8_gemm_supported(x.device):
            xq, x_scale = schemes.quantize_fp8_per_token(rows)
            out = torch._scaled_mm(xq, layer.weight.t(), scale_a=x_scale,
                                   scale_b=layer.weight_scale.view(1, -1),
                                   out_dtype=x.dtype)  # fmt: skip
        else:
            out = F.linear(rows, self.dequantize(layer).to(x.dtype))
        if layer.bias is not None:
            out = out + layer.bias
        return out.view(*x.shape[:-1], layer.out_features)
