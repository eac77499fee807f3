"""One rank's parts of a GGUF file's tensors, read as safetensors' `get_slice` reads.

A GGUF row is a run of blocks along the input (Q8_0 and Q4_0: 32 values; Q4_K and Q6_K:
256-value super-blocks). A column-parallel shard takes whole rows, so only its rows are read
and dequantized (or re-packed). A row-parallel shard takes columns: only its blocks are read
where its bounds are whole blocks; where they cut a block, the rank reads whole rows and keeps
its columns (the float values, or the re-packed layout's `slice_inputs`), which is exact too,
at the price of one whole tensor in memory for a moment.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from soberana.models.config import ModelConfig
from soberana.models.gguf import GGUFFile, hf_name, open_gguf, permuted_heads, unpermute
from soberana.quantization import QuantizationConfig, gguf_repack


class GGUFSlice:
    """Tensor `name` of `file`: `get_shape()`, and `[rows]` / `[rows, cols]` give float32
    values of only that part, q/k rows of Llama-family files un-permuted (`heads`)."""

    def __init__(self, file: GGUFFile, name: str, heads: int | None) -> None:
        self.file, self.name, self.heads = file, name, heads
        self.shape = file.tensors[name].shape

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def __getitem__(self, index) -> torch.Tensor:
        index = index if isinstance(index, tuple) else (index,)
        if len(self.shape) == 1:  # norms and biases: small, read whole
            t = self.file.dequantize(self.name)
            return (t if self.heads is None else unpermute(t, self.heads))[index]
        rows = index[0]
        cols = index[1] if len(index) > 1 else slice(None)
        return self._unpermute(self.file.dequantize_part(self.name, rows, cols), rows)

    def block_aligned(self, start: int, stop: int) -> bool:
        """Whether columns start:stop are whole blocks of this tensor's type."""
        return self.file.block_aligned(self.name, start, stop)

    def repacked(self, rows: slice, cols: slice, quantization: QuantizationConfig,
                 dtype: torch.dtype) -> gguf_repack.Repacked:  # fmt: skip
        """Rows `rows` x columns `cols` (whole blocks) in the layout of `quantization`, read
        and converted alone (gguf_repack.repack)."""
        info = self.file.tensors[self.name]
        r0, r1, _ = rows.indices(self.shape[0])
        c0, c1, _ = cols.indices(self.shape[1])
        raw = self.file.raw_part(self.name, rows, cols)
        out = gguf_repack.repack(
            raw, info.qtype, _type_name(info.qtype), (r1 - r0, c1 - c0), quantization.method,
            quantization.group_size, dtype,
            lambda: self.file.dequantize_part(self.name, rows, cols),
            float_zero=quantization.float_zero)  # fmt: skip
        if self.heads is not None:
            out.permute_rows(lambda t: self._unpermute(t, rows))
        return out

    def _unpermute(self, t: torch.Tensor, rows: slice) -> torch.Tensor:
        if self.heads is None:
            return t
        r0, r1, _ = rows.indices(self.shape[0])
        per_head = self.shape[0] // self.heads
        if r0 % per_head or r1 % per_head:
            raise ValueError(f"rows {r0}:{r1} of {self.name!r} cut its heads of {per_head}")
        return unpermute(t, (r1 - r0) // per_head)


def gguf_slices(path: Path, cfg: ModelConfig) -> Iterator[tuple[str, GGUFSlice]]:
    """(transformers name, GGUFSlice) for every weight of the file (`cfg`: the whole model's)."""
    f = open_gguf(path)
    for name in f.tensors:
        target = hf_name(name)
        if target is not None:
            yield target, GGUFSlice(f, name, permuted_heads(f, name, cfg))


def _type_name(qtype: int) -> str:
    from gguf.constants import GGMLQuantizationType

    return GGMLQuantizationType(qtype).name
