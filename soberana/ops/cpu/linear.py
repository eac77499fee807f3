"""Linear layers on CPU with their weights packed once.

`F.linear` on a CPU tensor reorders the weight into oneDNN's blocked layout on every call:
for a decode step of 64 tokens through a 125M model that is most of a second's worth of
copying per hundred steps. `pack_linears` packs once, when the model is loaded, and swaps
each `nn.Linear` (and the output projection) for a `PackedLinear`:
  - bfloat16: soberana's kernel (csrc/linear_bf16.c), on AVX512_BF16 or, on CPUs without it,
    AVX2 + FMA with the weights widened to float32 in registers. Measured on a
    2-core Zen 4 next to oneDNN's packed matmul (benchmarks/cpu_linear_ab.py): one row 0.72x
    the time, a 64-row decode step 0.97x, 2,048 rows 0.98-1.03x; the offline 128/128
    benchmark 0.4-0.6 s of ~12 s faster in alternating runs. Its float32 sums run in another
    order than oneDNN's, so about 1 output in 10,000 differs from `F.linear` by one ulp.
  - float32: soberana's kernel too (same file, AVX-512 or AVX2 + FMA; each sum in k order).
    Against oneDNN's packed float32 matmul on a 2-core Zen 4, one thread, SmolLM2-135M's
    linears (benchmarks/cpu_layers_isa.py): 1 row (batch-1 decode) about a third of the time,
    64 rows about the same.
  - otherwise oneDNN's matmul on the packed weight (PyTorch's own
    `mkldnn._linear_pointwise`, what Inductor emits for frozen CPU linears): bfloat16 outputs
    bit-identical to `F.linear`; float32 runs oneDNN's kernel instead of MKL's sgemm, so sums
    round differently (about 1e-7 relative).
A layer that fails the check at load time keeps `F.linear`; so does every layer on the
"torch" compute backend (ops/backend.py), which packs nothing.
"""

from __future__ import annotations

import ctypes
import logging

import torch
import torch.nn.functional as F
from torch import nn

from soberana.ops.cpu import kernels as cpu_kernels

logger = logging.getLogger("soberana.ops")

# The batch size oneDNN tunes the packed layout for (any size works): a decode step's rows.
BATCH_HINT = 64


class PackedLinear(nn.Module):
    """`x @ weight.T + bias` with `weight` packed once (read-only after): for soberana's own
    kernel (csrc/linear_bf16.c: bfloat16 on AVX512_BF16 or AVX2, float32 on AVX-512 or AVX2),
    else for oneDNN. `soberana_kernel=False` packs for oneDNN always (benchmarks' A/B)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None,
                 soberana_kernel: bool = True) -> None:  # fmt: skip
        super().__init__()
        self.out_features, self.in_features = weight.shape
        weight = weight.detach()
        self.native = None
        if soberana_kernel:
            pack_native = (cpu_kernels.pack_f32_linear if weight.dtype == torch.float32
                           else cpu_kernels.pack_bf16_linear)  # fmt: skip
            self.native = pack_native(weight)
        self.bias = None if bias is None else bias.detach()
        if self.native is not None:
            self.packed = None
            if self.bias is not None:  # the kernel reads it a panel of 64 columns at a time
                self.bias = F.pad(self.bias.to(weight.dtype), (0, -self.out_features % 64))
        else:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, BATCH_HINT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native is not None:
            rows = x.reshape(-1, self.in_features)
            f32 = self.native.dtype == torch.float32
            kernel = cpu_kernels.linear_f32 if f32 else cpu_kernels.linear_bf16
            out = kernel(rows, self.native, self.out_features, self.bias)
            return out.view(*x.shape[:-1], self.out_features)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def stack_linear(self) -> tuple[int, int, int | None] | None:
        """(C function, weight, bias) addresses through which the native decoder stack runs
        this layer on bfloat16 rows (csrc/cpu_forward.h's LinearFn), or None: float32 and
        oneDNN-packed weights it cannot run."""
        if self.native is None or self.native.dtype == torch.float32:
            return None
        function = ctypes.cast(cpu_kernels.linear_library().linear_bf16, ctypes.c_void_p).value
        return function, self.native.data_ptr(), None if self.bias is None else self.bias.data_ptr()

    def extra_repr(self) -> str:
        kind = f"soberana {self.native.dtype} kernel" if self.native is not None else "oneDNN"
        return f"in_features={self.in_features}, out_features={self.out_features}, packed ({kind})"


def packable(dtype: torch.dtype) -> bool:
    """Whether CPU linears of `dtype` can be packed here (oneDNN built in; bf16 and fp16 also
    need the CPU to support them natively)."""
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return True
    if dtype == torch.bfloat16:  # soberana's kernel also serves CPUs with AVX2 only
        return (torch.ops.mkldnn._is_mkldnn_bf16_supported()
                or cpu_kernels.linear_library() is not None)  # fmt: skip
    if dtype == torch.float16:
        return torch.ops.mkldnn._is_mkldnn_fp16_supported()
    return False


def pack(linear: nn.Linear | None, weight: torch.Tensor | None = None,
         soberana_kernel: bool = True) -> nn.Module | None:  # fmt: skip
    """A PackedLinear computing what `linear` (or `F.linear` with `weight`) does, or None where
    this build cannot pack it or the packed result disagrees with `F.linear` on a probe."""
    weight = linear.weight if weight is None else weight
    bias = None if linear is None else linear.bias
    if weight.device.type != "cpu" or weight.dim() != 2 or not packable(weight.dtype):
        return None
    try:
        packed = PackedLinear(weight, bias, soberana_kernel)
        probe = torch.randn(3, weight.shape[1], generator=torch.Generator().manual_seed(0))
        probe = probe.to(weight.dtype)
        want, got = F.linear(probe, weight, bias).float(), packed(probe).float()
    except RuntimeError as e:  # an op this build or CPU lacks
        logger.info("oneDNN weight packing unavailable (%s); CPU linears use F.linear", e)
        return None
    tol = 1e-4 if weight.dtype == torch.float32 else 2e-2
    if not torch.allclose(got, want, rtol=tol, atol=tol * want.abs().max().item()):
        logger.info("oneDNN packed linear disagrees with F.linear; CPU linears use F.linear")
        return None
    return packed


def pack_linears(model: nn.Module) -> int:
    """Replace every CPU `nn.Linear` in `model` by its PackedLinear; returns how many.

    Stops at the first that cannot be packed (they share dtype and device), leaving the rest
    as they are.
    """
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                packed = pack(child)
                if packed is None:
                    return count
                setattr(parent, name, packed)
                count += 1
    return count
