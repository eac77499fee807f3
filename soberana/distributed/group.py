"""The tensor-parallel process group: collectives of the forward pass and step broadcasts.

Two groups over the same ranks: `device` (NCCL on GPUs, gloo on CPUs) for the collectives
and the step's tensors, and `cpu` (always gloo) for the small pickled step header, so
broadcasting it never waits on the GPU stream (vLLM keeps the same pair).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

# NVLink SHARP multicast (NVLS) must stay off on the GPU hosts here; PyTorch's symmetric
# memory and NVSHMEM have their own switches for it.
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                 "NVSHMEM_DISABLE_NVLS": "1"}


def set_launcher_env() -> None:
    """Environment every rank needs before NCCL starts (inherited by spawned workers)."""
    for key, value in MULTICAST_OFF.items():
        os.environ.setdefault(key, value)


class TPGroup:
    def __init__(self, rank: int, world_size: int, init_method: str, device: torch.device,
                 timeout_s: float = 600.0) -> None:
        set_launcher_env()
        from datetime import timedelta

        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, init_method=init_method, rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=timeout_s))
        self.rank, self.world_size, self.device = rank, world_size, device
        self.device_group = dist.group.WORLD
        self.cpu_group = dist.new_group(backend="gloo") if backend != "gloo" else self.device_group

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of every rank's partial `x` (after row-parallel projections), in place."""
        dist.all_reduce(x, group=self.device_group)
        return x

    def gather_vocab(self, logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """[N, V/tp] shards -> the full [N, vocab_size] rows on every rank (padding cut)."""
        n, part = logits.shape
        out = torch.empty(self.world_size * n, part, dtype=logits.dtype, device=logits.device)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(out, logits.contiguous(), group=self.device_group)
        return out.view(self.world_size, n, part).permute(1, 0, 2).reshape(n, self.world_size * part)[:, :vocab_size]

    def send_header(self, header: object) -> object:
        """Rank 0: broadcast `header` (a small picklable object); others: return rank 0's."""
        box = [header]
        dist.broadcast_object_list(box, src=0, group=self.cpu_group)
        return box[0]

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's `x` on every rank (others pass a buffer of the same shape and dtype)."""
        dist.broadcast(x, src=0, group=self.device_group)
        return x

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
