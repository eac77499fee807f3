"""Which quantization serves a model: `--quantization`, or the checkpoint's own
`quantization_config` (vLLM's `QuantizationConfig`), checked against the hardware at start.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from soberana.quantization import gguf_repack, schemes
from soberana.quantization.linear import (
    Fp8LinearMethod,
    Int4LinearMethod,
    Int8LinearMethod,
    LinearMethod,
    fp8_gemm_supported,
)

# int8_w8a16: int8 weight-only everywhere (the exact path); int8 quantizes activations too on
# CPUs with the W8A8 kernel (docs/quantization.md says why that is the default there).
QUANTIZATION_METHODS = ("int8", "int8_w8a16", "int4", "fp8")
KV_CACHE_DTYPES = ("auto", "fp8")


@dataclass(frozen=True)
class QuantizationConfig:
    """One scheme for every decoder projection (the embedding and output head stay in the
    model dtype, as vLLM's compressed-tensors checkpoints leave `lm_head` unquantized).

    `method`: int8 | int4 | fp8. `source`: "on-the-fly" (quantized at load from float weights)
    or "compressed-tensors" (the checkpoint holds quantized tensors). `checkpoint_format`
    names the compressed-tensors layout of the stored tensors.
    """

    method: str
    group_size: int = schemes.INT4_GROUP_SIZE
    source: str = "on-the-fly"
    checkpoint_format: str = ""
    symmetric: bool = False
    float_zero: bool = False  # int4 zero points in the model dtype (GGUF Q4_K / Q4_1 re-packed)
    # int8: "dynamic" (activations int8 per token where the CPU kernel serves it) or "none"
    activations: str = "dynamic"

    @classmethod
    def named(cls, quantization: str, **fields) -> QuantizationConfig:
        """The config of a `--quantization` name (int8_w8a16 is int8 with activations none)."""
        if quantization == "int8_w8a16":
            return cls(method="int8", activations="none", **fields)
        return cls(method=quantization, **fields)

    def linear_method(self) -> LinearMethod:
        if self.method == "int8":
            return Int8LinearMethod(self.activations)
        if self.method == "int4":
            return Int4LinearMethod(self.group_size, self.float_zero)
        return Fp8LinearMethod()

    def verify_supported(self, device: torch.device) -> None:
        """Raise ValueError at start when `device` cannot run this scheme as specified."""
        if self.method == "fp8" and device.type == "cuda" and not fp8_gemm_supported(device):
            cc = ".".join(map(str, torch.cuda.get_device_capability(device)))
            raise ValueError(
                f"quantization fp8 (W8A8) needs FP8 matrix units: NVIDIA compute capability "
                f">= 8.9 (Ada, Hopper); this GPU is {cc}. Use --quantization int8 instead."
            )

    def describe(self) -> str:
        """One line for the log and /v1/models."""
        return f"{self.linear_method().name}, {self.source}" + (
            f" ({self.checkpoint_format})" if self.checkpoint_format else "")  # fmt: skip


def gguf_quantization(quantization: str | None, linear_types: dict[str, int]
                      ) -> QuantizationConfig | None:  # fmt: skip
    """The scheme for a GGUF file whose decoder projections are stored as `linear_types`
    (GGML type name -> count). Without `quantization` the weights are dequantized to the model
    dtype (the fastest path on CPUs, where int4 has no kernel). With int8 or int4 they are
    re-packed (gguf_repack.py); int4 takes the GGUF's groups of 32 where 4-bit blocks are
    stored, so their codes are kept, and zero points in the model dtype where Q4_K / Q4_1
    offsets are not whole steps."""
    if quantization is None:
        return None
    if quantization not in QUANTIZATION_METHODS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_METHODS)}; "
                         f"got {quantization!r}")  # fmt: skip
    stored = ", ".join(f"{name} x{n}" for name, n in sorted(linear_types.items()))
    four_bit = quantization == "int4" and bool({"Q4_0", "Q4_1", "Q4_K"} & set(linear_types))
    group = gguf_repack.GGUF_INT4_GROUP if four_bit else schemes.INT4_GROUP_SIZE
    how = "quantized from GGUF" if quantization == "fp8" else "re-packed from GGUF"
    return QuantizationConfig.named(quantization, group_size=group, source=how,
                              checkpoint_format=stored,
                              float_zero=four_bit and bool({"Q4_1", "Q4_K"} & set(linear_types)))  # fmt: skip


def resolve_quantization(quantization: str | None, hf_config: dict) -> QuantizationConfig | None:
    """The scheme a model is served with: the checkpoint's `quantization_config` if it has
    one (an explicit `--quantization` must then agree with it), else `quantization`."""
    if quantization is not None and quantization not in QUANTIZATION_METHODS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_METHODS)}; "
                         f"got {quantization!r}")  # fmt: skip
    stored = hf_config.get("quantization_config")
    if stored is None:
        return None if quantization is None else QuantizationConfig.named(quantization)
    from soberana.quantization.compressed_tensors import config_from_checkpoint

    cfg = config_from_checkpoint(stored)
    if quantization is not None and QuantizationConfig.named(quantization).method != cfg.method:
        raise ValueError(f"--quantization {quantization} conflicts with the checkpoint, which "
                         f"is stored as {cfg.method} ({cfg.checkpoint_format}); omit the flag")  # fmt: skip
    return cfg
