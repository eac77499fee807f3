"""Inputs shared by the per-token quantization tests (interpreter and GPU)."""

from __future__ import annotations

import torch

from soberana.quantization import schemes


def tie_rows(fp8: bool) -> torch.Tensor:
    """8 float32 rows whose first value is the target's largest (448 for fp8, 127 for int8), so
    every row's scale is exactly 1 and the quotients are the values themselves: every midpoint
    between two neighbours of the grid (the ties rounding must break to even), the grid points,
    signed zeros and values below the smallest step."""
    qmax = schemes.FP8_MAX if fp8 else schemes.INT8_MAX
    if fp8:
        grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
        grid = grid[grid.isfinite()].unique()
    else:
        grid = torch.arange(-127.0, 128.0)
    mids = (grid[1:] + grid[:-1]) / 2
    extra = torch.tensor([-0.0, 0.0, -1e-30, 1e-30, 2.0**-12, -(2.0**-10)])
    values = torch.cat([mids, grid, extra])
    rows = values[: values.numel() // 8 * 8].reshape(8, -1).clone()
    rows[:, 0] = qmax
    return rows
