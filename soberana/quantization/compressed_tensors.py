"""Pre-quantized `compressed-tensors` checkpoints (what llm-compressor writes and vLLM users
download), read into our own layouts at load.

Served: W8A16 and W4A16 (`pack-quantized`, symmetric int with `weight_packed` int32 words of
offset-coded values, low bits first, plus `weight_scale`), int8 stored unpacked
(`int-quantized` / `naive-quantized`: `weight` int8), and FP8 W8A8 (`float-quantized` /
`naive-quantized`: `weight` float8_e4m3fn with a per-channel or per-tensor `weight_scale`).
Activation scales are always computed per token at run time: a static `input_scale` in the
checkpoint is read past (logged), which costs no accuracy.
"""

from __future__ import annotations

import logging

import torch

from soberana.quantization import schemes
from soberana.quantization.config import QuantizationConfig

log = logging.getLogger(__name__)

_INT_FORMATS = ("pack-quantized", "int-quantized", "naive-quantized")
_FLOAT_FORMATS = ("float-quantized", "naive-quantized")


def config_from_checkpoint(stored: dict) -> QuantizationConfig:
    """The QuantizationConfig of a config.json `quantization_config`, or ValueError naming
    what this build does not serve."""
    method = stored.get("quant_method")
    if method != "compressed-tensors":
        raise ValueError(f"quantization_config.quant_method {method!r} is not supported; "
                         "served: compressed-tensors (or an unquantized checkpoint with "
                         "--quantization int8|int4|fp8)")  # fmt: skip
    fmt = stored.get("format", "")
    groups = list((stored.get("config_groups") or {}).values())
    if len(groups) != 1:
        raise ValueError(f"compressed-tensors: exactly one config group is served; "
                         f"got {len(groups)}")  # fmt: skip
    weights = groups[0].get("weights") or {}
    bits, kind = weights.get("num_bits"), weights.get("type")
    strategy = weights.get("strategy")
    if kind == "float" and bits == 8 and fmt in _FLOAT_FORMATS:
        if strategy not in ("channel", "tensor"):
            raise ValueError(f"compressed-tensors fp8: weight strategy {strategy!r} is not "
                             "served (channel or tensor)")  # fmt: skip
        return QuantizationConfig(method="fp8", source="compressed-tensors",
                                  checkpoint_format=fmt, symmetric=True)  # fmt: skip
    if kind == "int" and fmt in _INT_FORMATS and weights.get("symmetric", True):
        if bits == 8 and strategy == "channel":
            # W8A16 as stored: the checkpoint's activations are not quantized
            return QuantizationConfig(method="int8", source="compressed-tensors",
                                      checkpoint_format=fmt, symmetric=True,
                                      activations="none")  # fmt: skip
        if bits == 4 and strategy == "group" and fmt == "pack-quantized":
            return QuantizationConfig(method="int4", group_size=int(weights["group_size"]),
                                      source="compressed-tensors", checkpoint_format=fmt,
                                      symmetric=True)  # fmt: skip
    raise ValueError(
        f"compressed-tensors scheme not served: format {fmt!r}, weights {bits}-bit {kind} "
        f"strategy {strategy!r} symmetric {weights.get('symmetric')}; served: W8A16 "
        "(int8 per channel), W4A16 (int4 group, pack-quantized), FP8 (channel or tensor)"
    )


def required_parts(cfg: QuantizationConfig) -> tuple[str, ...]:
    """The tensor suffixes (after `<layer>.`) that make up one stored linear."""
    if cfg.method == "fp8":
        return ("weight", "weight_scale")
    if cfg.checkpoint_format == "pack-quantized":
        return ("weight_packed", "weight_scale")
    return ("weight", "weight_scale")


IGNORED_PARTS = ("weight_shape", "input_scale", "weight_g_idx")


def unpack_int32(packed: torch.Tensor, num_bits: int, cols: int) -> torch.Tensor:
    """Signed values int8 [N, cols] of compressed-tensors' int32 words (offset coding)."""
    per_word = 32 // num_bits
    shifts = torch.arange(per_word, dtype=torch.int32, device=packed.device) * num_bits
    vals = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << num_bits) - 1)
    vals = vals.reshape(packed.shape[0], -1)[:, :cols]
    return (vals - (1 << (num_bits - 1))).to(torch.int8)


def pack_int32(q: torch.Tensor, num_bits: int) -> torch.Tensor:
    """int32 words of signed values int8 [N, K] (compressed-tensors' pack_to_int32)."""
    per_word = 32 // num_bits
    u = (q.to(torch.int32) + (1 << (num_bits - 1))).reshape(q.shape[0], -1, per_word)
    shifts = torch.arange(per_word, dtype=torch.int32) * num_bits
    return (u << shifts).sum(dim=2, dtype=torch.int32)


def to_layer_layout(cfg: QuantizationConfig, parts: dict[str, torch.Tensor],
                    in_features: int) -> dict[str, torch.Tensor]:  # fmt: skip
    """One stored linear's tensors in our layout (the QuantLinear buffer names)."""
    scale = parts["weight_scale"].float()
    if cfg.method == "fp8":
        w = parts["weight"]
        if w.dtype != torch.float8_e4m3fn:
            raise ValueError(f"compressed-tensors fp8 weight must be float8_e4m3fn, got {w.dtype}")
        # a per-tensor scale becomes the same scale on every row (fused q/k/v keep theirs)
        return {"weight": w, "weight_scale": scale.reshape(-1).expand(w.shape[0]).clone()}
    if cfg.method == "int8":
        q = parts["weight"] if "weight" in parts else unpack_int32(parts["weight_packed"], 8,
                                                                  in_features)  # fmt: skip
        return {"weight": q.to(torch.int8), "weight_scale": scale.reshape(-1)}
    q = unpack_int32(parts["weight_packed"], 4, in_features)  # symmetric: -8..7
    # Our int4 is asymmetric with a stored zero point: symmetric q is (q + 8) - 8.
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    zero = torch.full(scale.shape, 8, dtype=torch.uint8)
    return {"weight": schemes.pack_int4(u), "weight_scale": scale, "weight_zero": zero}
