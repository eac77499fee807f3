"""GGUF blocks re-packed at load into our int8 / int4 layouts, with the conversion error.

llama.cpp stores a linear's rows in blocks (Q8_0 and Q4_0: 32 values and one float16 scale;
Q4_K: 256 values in 8 groups of 32, each with a 6-bit scale and a 6-bit min; Q6_K: 256 values
in 16 groups of 16 with int8 scales). `--quantization int4|int8` on a GGUF file keeps the
weights quantized instead of widening them to the model dtype:

- int4 (groups of 32, the GGUF block): the 4-bit values are kept. Q4_0: scale = d, zero
  point 8. Q4_K (scale = d x group scale, offset dmin x group min) and Q4_1 (scale d,
  offset m): zero point = offset / scale, a fraction, held in the model dtype
  (`float_zero`: exact up to that dtype's rounding); with uint8 zero points it is rounded to
  a whole step (off by up to half a step per group: about as much error again as the 4-bit
  quantization itself, measured) and Q4_1 is quantized afresh (its offset may be positive).
  Other types are dequantized and quantized afresh (schemes.quantize_int4).
- int8 (one scale per output row): every type is dequantized and quantized afresh
  (schemes.quantize_int8): 8-bit per-row codes of 32-value blocks cannot be kept as they are.

`repack` returns the layer's rows with the error against the GGUF's own dequantized weight
(relative RMS and largest absolute), which the loader logs per source type.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from soberana.quantization import schemes

GGUF_INT4_GROUP = 32  # the 4-bit GGUF types' block (Q4_0, Q4_1) and sub-block (Q4_K)
# GGMLQuantizationType values
Q4_0, Q4_1, Q8_0, Q4_K, Q6_K = 2, 3, 8, 12, 14
FOUR_BIT_TYPES = (Q4_0, Q4_1, Q4_K)  # served as int4 with groups of 32


@dataclass
class Repacked:
    """One GGUF tensor in a layer's layout: `parts` are the layer's buffers' rows."""

    parts: dict[str, torch.Tensor]
    source_type: str  # the GGUF type, e.g. "Q4_K"
    kept_codes: bool  # the 4-bit values were kept (not quantized afresh)
    rel_rms_error: float  # RMS(ours - GGUF's) / RMS(GGUF's)
    max_abs_error: float

    def permute_rows(self, fn) -> None:
        """Apply a row permutation (`fn` on a 2-D tensor) to every part: all are per-row."""
        self.parts = {k: fn(v) for k, v in self.parts.items()}


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    return blocks[:, at:at + 2].copy().view(np.float16).astype(np.float32)


def q4_0_fields(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes uint8 [blocks, 32], scale [blocks, 1], min [blocks, 1]): value = code*scale - min."""
    b = raw.reshape(-1, 18)
    qs = b[:, 2:]
    codes = np.concatenate((qs & 0x0F, qs >> 4), axis=1)
    d = _f16(b, 0)
    return codes, d, 8.0 * d


def q4_1_fields(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """As q4_0_fields for Q4_1 blocks (d, m, 16 bytes): value = d * code + m."""
    b = raw.reshape(-1, 20)
    qs = b[:, 4:]
    return np.concatenate((qs & 0x0F, qs >> 4), axis=1), _f16(b, 0), -_f16(b, 2)


def q4_k_fields(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_K super-blocks (144 bytes: d, dmin, 12 bytes of 6-bit scales/mins, 128 bytes of
    nibbles) as 32-value groups: (codes [groups, 32], scale [groups, 1], min [groups, 1])."""
    b = raw.reshape(-1, 144)
    d, dmin = _f16(b, 0), _f16(b, 2)
    s = b[:, 4:16].astype(np.uint8)
    sc = np.empty((b.shape[0], 8), dtype=np.uint8)
    mn = np.empty_like(sc)
    sc[:, :4], mn[:, :4] = s[:, 0:4] & 63, s[:, 4:8] & 63
    sc[:, 4:] = (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)
    mn[:, 4:] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    qs = b[:, 16:].reshape(-1, 4, 32)  # 4 chunks of 64 values: low nibbles, then high ones
    codes = np.stack((qs & 0x0F, qs >> 4), axis=2).reshape(-1, 32)
    scale = (d * sc.astype(np.float32)).reshape(-1, 1)
    minv = (dmin * mn.astype(np.float32)).reshape(-1, 1)
    return codes, scale, minv


def dequantize_q4_k(raw: np.ndarray) -> np.ndarray:
    codes, scale, minv = q4_k_fields(raw)
    return (codes.astype(np.float32) * scale - minv).reshape(-1)


def dequantize_q6_k(raw: np.ndarray) -> np.ndarray:
    """Q6_K super-blocks (210 bytes: 128 low-nibble bytes, 64 bytes of 2-bit highs, 16 int8
    group scales, float16 d): d * scale * (code - 32), groups of 16."""
    b = raw.reshape(-1, 210)
    ql = b[:, :128].reshape(-1, 2, 64)
    qh = b[:, 128:192].reshape(-1, 2, 32)
    q = np.empty((b.shape[0], 2, 128), dtype=np.uint8)
    q[:, :, 0:32] = (ql[:, :, :32] & 0x0F) | ((qh & 3) << 4)
    q[:, :, 32:64] = (ql[:, :, 32:] & 0x0F) | (((qh >> 2) & 3) << 4)
    q[:, :, 64:96] = (ql[:, :, :32] >> 4) | (((qh >> 4) & 3) << 4)
    q[:, :, 96:128] = (ql[:, :, 32:] >> 4) | (((qh >> 6) & 3) << 4)
    values = q.reshape(-1, 16, 16).astype(np.float32) - 32.0
    scales = b[:, 192:208].copy().view(np.int8).astype(np.float32) * _f16(b, 208)
    return (values * scales.reshape(-1, 16, 1)).reshape(-1)


_FIELDS = {Q4_0: q4_0_fields, Q4_1: q4_1_fields, Q4_K: q4_k_fields}


def repack(raw: np.ndarray, qtype: int, type_name: str, shape: tuple[int, int],
           method: str, group_size: int, scale_dtype: torch.dtype, dequantize,
           float_zero: bool = False) -> Repacked:  # fmt: skip
    """Rows of one GGUF tensor (`raw`: its bytes, `shape`: [N, K]) in the layout of `method`
    ("int8" or "int4" with `group_size`, zero points in `scale_dtype` with `float_zero`),
    scales rounded to `scale_dtype` as the layer holds them. `dequantize()` gives the GGUF's
    own float32 [N, K] (the reference)."""
    n, k = shape
    fields = _FIELDS.get(qtype) if method == "int4" and group_size == GGUF_INT4_GROUP else None
    if qtype == Q4_1 and not float_zero:
        fields = None
    if fields is not None:
        codes, scale, minv = fields(raw)
        codes = codes.reshape(n, k)
        scale = scale.reshape(n, k // GGUF_INT4_GROUP)
        minv = minv.reshape(n, k // GGUF_INT4_GROUP)
        reference = torch.from_numpy(
            (codes.reshape(n, -1, GGUF_INT4_GROUP).astype(np.float32) * scale[..., None]
             - minv[..., None]).reshape(n, k))  # fmt: skip
        safe = np.where(scale != 0, scale, 1.0)
        if float_zero:
            zero = torch.from_numpy(minv / safe).to(scale_dtype)
        else:
            zero = torch.from_numpy(np.clip(np.rint(minv / safe), 0, 15).astype(np.uint8))
        parts = {"weight": schemes.pack_int4(torch.from_numpy(np.ascontiguousarray(codes))),
                 "weight_scale": torch.from_numpy(scale).to(scale_dtype), "weight_zero": zero}
        ours = schemes.dequantize_int4(parts["weight"], parts["weight_scale"], parts["weight_zero"])
        kept = True
    else:
        reference = dequantize()
        if method == "int4":
            packed, scale, zero = schemes.quantize_int4(
                reference, schemes.group_size_for(k, group_size))
            parts = {"weight": packed, "weight_scale": scale.to(scale_dtype), "weight_zero": zero}
            ours = schemes.dequantize_int4(packed, parts["weight_scale"], zero)
        elif method == "int8":
            q, scale = schemes.quantize_int8(reference)
            parts = {"weight": q, "weight_scale": scale.to(scale_dtype)}
            ours = schemes.dequantize_int8(q, parts["weight_scale"])
        else:
            raise ValueError(f"GGUF re-packing serves int8 and int4; got method {method!r}")
        kept = False
    diff = ours - reference
    rms = float(reference.pow(2).mean().sqrt())
    rel = float(diff.pow(2).mean().sqrt()) / rms if rms > 0 else 0.0
    return Repacked(parts, type_name, kept, rel, float(diff.abs().max()))


class RepackLog:
    """Conversion error per GGUF source type, for the one log line at the end of loading."""

    def __init__(self) -> None:
        self.by_type: dict[str, list[Repacked]] = {}

    def add(self, r: Repacked) -> None:
        self.by_type.setdefault(r.source_type, []).append(r)

    def summary(self) -> str:
        out = []
        for name, items in sorted(self.by_type.items()):
            worst = max(items, key=lambda r: r.rel_rms_error)
            mean = math.fsum(r.rel_rms_error for r in items) / len(items)
            how = "4-bit codes kept" if all(r.kept_codes for r in items) else "re-quantized"
            out.append(f"{name} x{len(items)} ({how}): relative RMS error mean {mean:.2e}, "
                       f"max {worst.rel_rms_error:.2e}, largest absolute "
                       f"{max(r.max_abs_error for r in items):.2e}")  # fmt: skip
        return "; ".join(out)
