"""Q4_K and Q6_K encoders for test files (gguf-py's `quants.quantize` implements neither).

Plain min/max rounding, not llama.cpp's search for the best scales: these only have to write
valid blocks of realistic values. Whether the bytes mean what we think is checked against
gguf-py's own `quants.dequantize`, the reference every test compares with.
"""

from __future__ import annotations

import numpy as np


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).reshape(-1, 1).view(np.uint8)


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """float32 [rows, K] (K a multiple of 256) -> uint8 [rows, K / 256 * 144]."""
    rows, k = x.shape
    g = x.reshape(-1, 8, 32).astype(np.float32)  # super-blocks of 8 groups of 32
    lo = np.minimum(g.min(axis=2), 0.0)
    scale = (g.max(axis=2) - lo) / 15.0
    d = (scale.max(axis=1) / 63.0).astype(np.float16).astype(np.float32)
    dmin = ((-lo).max(axis=1) / 63.0).astype(np.float16).astype(np.float32)
    sc = np.clip(np.rint(scale / np.where(d > 0, d, 1)[:, None]), 1, 63).astype(np.uint8)
    mn = np.clip(np.rint(-lo / np.where(dmin > 0, dmin, 1)[:, None]), 0, 63).astype(np.uint8)
    step = d[:, None] * sc
    codes = np.clip(np.rint((g + (dmin[:, None] * mn)[..., None]) / step[..., None]), 0, 15)
    codes = codes.astype(np.uint8)
    s = np.zeros((g.shape[0], 12), dtype=np.uint8)
    s[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    s[:, 4:8] = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    s[:, 8:12] = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    pairs = codes.reshape(-1, 4, 2, 32)  # chunk c: group 2c low nibbles, 2c + 1 high ones
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)
    blocks = np.concatenate((_f16_bytes(d), _f16_bytes(dmin), s, qs), axis=1)
    return blocks.reshape(rows, -1)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """float32 [rows, K] (K a multiple of 256) -> uint8 [rows, K / 256 * 210]."""
    rows, k = x.shape
    g = x.reshape(-1, 16, 16).astype(np.float32)  # super-blocks of 16 groups of 16
    scale = np.abs(g).max(axis=2) / 31.0
    d = (scale.max(axis=1) / 127.0).astype(np.float16).astype(np.float32)
    sc = np.clip(np.rint(scale / np.where(d > 0, d, 1)[:, None]), 1, 127).astype(np.int8)
    step = d[:, None] * sc
    q = (np.clip(np.rint(g / step[..., None]), -32, 31) + 32).astype(np.uint8)
    q = q.reshape(-1, 2, 128)
    ql = np.empty((q.shape[0], 2, 64), dtype=np.uint8)
    ql[:, :, :32] = (q[:, :, 0:32] & 0x0F) | ((q[:, :, 64:96] & 0x0F) << 4)
    ql[:, :, 32:] = (q[:, :, 32:64] & 0x0F) | ((q[:, :, 96:128] & 0x0F) << 4)
    qh = ((q[:, :, 0:32] >> 4) | ((q[:, :, 32:64] >> 4) << 2) | ((q[:, :, 64:96] >> 4) << 4)
          | ((q[:, :, 96:128] >> 4) << 6))  # fmt: skip
    blocks = np.concatenate((ql.reshape(-1, 128), qh.reshape(-1, 64), sc.view(np.uint8),
                             _f16_bytes(d)), axis=1)  # fmt: skip
    return blocks.reshape(rows, -1)
