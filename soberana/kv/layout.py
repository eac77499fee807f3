"""The KV layout a block's bytes belong to: a block is only ever loaded into the same layout."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# Axis order of the engine's cache tensor (docs/engine-core.md): one block across all layers
# is kv_cache[:, :, block_id], shape [num_layers, 2, block_size, num_kv_heads, head_dim].
KV_CACHE_AXES = "layer,kv,block,slot,kv_head,head_dim"

_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1}


@dataclass(frozen=True)
class KVLayout:
    """Everything that decides whether a block's bytes mean the same thing in two engines.

    `model_fingerprint` is the weights' identity (`LoadedModel.fingerprint`); `dtype` the
    cache's torch dtype name without the `torch.` prefix. Under tensor parallelism
    (`tensor_parallel_size` > 1) a block is the *gathered* block: every KV head of the model
    once, assembled from the ranks' shards (docs/distributed.md); the size is in the
    fingerprint, so such entries are never served to an engine of another size.
    """

    model_fingerprint: str
    dtype: str
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    kv_layout: str = KV_CACHE_AXES
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        if self.dtype not in _ITEMSIZE:
            raise ValueError(f"dtype must be one of {sorted(_ITEMSIZE)}; got {self.dtype!r}")
        for name in ("block_size", "num_layers", "num_kv_heads", "head_dim",
                     "tensor_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")

    @classmethod
    def from_kv_cache(cls, kv_cache: torch.Tensor, model_fingerprint: str) -> KVLayout:
        """The layout of an engine cache `[num_layers, 2, num_blocks, block_size, heads, dim]`."""
        if kv_cache.dim() != 6 or kv_cache.shape[1] != 2:
            raise ValueError(
                "kv_cache must be [num_layers, 2, num_blocks, block_size, num_kv_heads, "
                f"head_dim]; got shape {tuple(kv_cache.shape)}"
            )
        num_layers, _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
        return cls(
            model_fingerprint=model_fingerprint,
            dtype=str(kv_cache.dtype).removeprefix("torch."),
            block_size=block_size,
            num_layers=num_layers,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
        )

    @property
    def block_shape(self) -> tuple[int, int, int, int, int]:
        """Shape of one block across all layers: `kv_cache[:, :, block_id]`."""
        return (self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch  # here, so that processes that only move entry bytes never load torch

        return getattr(torch, self.dtype)

    @property
    def block_nbytes(self) -> int:
        """Bytes of one block's payload."""
        n = _ITEMSIZE[self.dtype]
        for dim in self.block_shape:
            n *= dim
        return n

    @cached_property
    def fingerprint(self) -> bytes:
        """32 bytes naming this layout; every stored entry carries it and is checked on read."""
        text = (
            f"soberana-kv-layout-v1|{self.model_fingerprint}|{self.dtype}|{self.block_size}|"
            f"{self.num_layers}|{self.num_kv_heads}|{self.head_dim}|{self.kv_layout}"
        )
        if self.tensor_parallel_size > 1:  # one rank's names are unchanged (stored entries)
            text += f"|tp{self.tensor_parallel_size}"
        return hashlib.sha256(text.encode()).digest()

    @property
    def namespace(self) -> str:
        """Short hex prefix that keeps different layouts' keys and files apart in shared stores."""
        return self.fingerprint.hex()[:16]
