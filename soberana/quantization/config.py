"""Which quantization serves a model: `--quantization`, or the checkpoint's own
`quantization_config` (vLLM's `QuantizationConfig`), checked against the hardware at start.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
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
    """One scheme for every decoder projection and, where `lm_head_quantized`, the output head
    (the embedding lookup stays in the model dtype).

    `method`: int8 | int4 | fp8. `source`: "on-the-fly" (quantized at load from float weights)
    or "compressed-tensors" (the checkpoint holds quantized tensors). `checkpoint_format`
    names the compressed-tensors layout of the stored tensors. `lm_head_quantized` is vLLM's
    name (its GPTQ/AWQ configs read it from the checkpoint's `"lm_head": true`): None until
    `resolved` decides it for the device (see `resolved`).
    """

    method: str
    group_size: int = schemes.INT4_GROUP_SIZE
    source: str = "on-the-fly"
    checkpoint_format: str = ""
    symmetric: bool = False
    float_zero: bool = False  # int4 zero points in the model dtype (GGUF Q4_K / Q4_1 re-packed)
    # int8: "dynamic" (activations int8 per token where the CPU kernel serves it) or "none"
    activations: str = "dynamic"
    lm_head_quantized: bool | None = None

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

    def resolved(self, device: torch.device, int8_kernels: Mapping[str, object]
                 ) -> QuantizationConfig:  # fmt: skip
        """This config with `lm_head_quantized` decided for `device`, whose CPU int8 kernels
        (`Kernels.int8_linears`) are given. Default: on for int8 on CPUs with the W8A8 kernel
        only. There the head is the largest single weight (SmolLM2-135M: 49,152 x 576, 57 MB of
        bfloat16 read per token, a third of a decode step's bytes), llama.cpp's Q8_0 quantizes
        it too, and the W8A8 head costs +0.0x% perplexity (docs/quantization.md); elsewhere the
        head stays in the model dtype, as vLLM leaves it unless the checkpoint says otherwise."""
        if self.lm_head_quantized is not None:
            return self
        default = (device.type == "cpu" and self.method == "int8" and self.activations == "dynamic"
                   and self.source != "compressed-tensors" and "w8a8" in int8_kernels)  # fmt: skip
        return dataclasses.replace(self, lm_head_quantized=default)

    def verify_supported(self, device: torch.device) -> None:
        """Raise ValueError at start when `device` cannot run this scheme as specified."""
        if self.lm_head_quantized and (device.type != "cpu" or self.method != "int8"
                                       or self.source == "compressed-tensors"):  # fmt: skip
            raise ValueError(
                f"lm_head_quantized: the output head is quantized only by int8 at load on CPUs "
                f"in this version; this is {self.method} ({self.source}) on {device.type}. "
                f"Leave lm_head_quantized unset or false."
            )
        if self.method == "fp8" and device.type == "cuda" and not fp8_gemm_supported(device):
            cc = ".".join(map(str, torch.cuda.get_device_capability(device)))
            raise ValueError(
                f"quantization fp8 (W8A8) needs FP8 matrix units: NVIDIA compute capability "
                f">= 8.9 (Ada, Hopper); this GPU is {cc}. Use --quantization int8 instead."
            )

    def kv_identity(self) -> str:
        """What of this scheme names the KV blocks it computes (loader fingerprints): all but
        the output head, which changes no key or value."""
        return repr(dataclasses.replace(self, lm_head_quantized=None))

    def describe(self) -> str:
        """One line for the log and /v1/models."""
        head = ", output head (lm_head) int8" if self.lm_head_quantized else ""
        return f"{self.linear_method().name}, {self.source}" + (
            f" ({self.checkpoint_format})" if self.checkpoint_format else "") + head  # fmt: skip


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


def with_lm_head(quantization: QuantizationConfig | None, lm_head_quantized: bool | None
                 ) -> QuantizationConfig | None:  # fmt: skip
    """`quantization` with the user's `lm_head_quantized` (None: the device's default, decided
    at load by `QuantizationConfig.resolved`)."""
    if lm_head_quantized is None:
        return quantization
    if quantization is None:
        if lm_head_quantized:
            raise ValueError("lm_head_quantized needs a quantization scheme (--quantization "
                             "int8): the head is quantized with the decoder's linears")  # fmt: skip
        return None
    return dataclasses.replace(quantization, lm_head_quantized=lm_head_quantized)
