"""The write path's thread: blocks leave the caller at once and are stored in the background."""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from soberana.kv.layout import KVLayout
from soberana.kv.loader import STAGING_BYTES, as_block_rows, blocks_dim, check_cache, runs

logger = logging.getLogger(__name__)

# (block hash, payload as [block_nbytes] uint8, source tier or None for the engine's blocks)
StoreFn = Callable[[bytes, torch.Tensor, "str | None"], None]


@dataclass
class _Job:
    key: bytes
    slot: int
    ready: torch.cuda.Event | None  # set when the copy off the GPU is still in flight
    source: str | None


class BlockWriter:
    """A fixed staging buffer of block-sized slots (pinned on CUDA hosts) and one thread.

    `submit` takes a free slot, starts the copy into it and returns; with no free slot it
    drops the block. The buffer is the queue bound: memory is fixed and the caller never
    waits on a slow tier. On a GPU the copy is queued on the caller's current stream, so it
    reads the block before any later kernel on that stream overwrites it.
    """

    def __init__(
        self, layout: KVLayout, store: StoreFn, buffer_bytes: int, pin_memory: bool
    ) -> None:
        self.layout = layout
        self.depth = max(1, buffer_bytes // layout.block_nbytes)
        # Blocks gathered on the device at once: bounds the temporary it needs.
        self.gather_blocks = max(1, STAGING_BYTES // layout.block_nbytes)
        self._store = store
        self._staging = torch.empty(
            (self.depth, layout.block_nbytes), dtype=torch.uint8, pin_memory=pin_memory
        )
        self._free_slots = list(range(self.depth))
        self._jobs: deque[_Job] = deque()
        self._in_flight = 0  # submitted and not yet stored
        self._closing = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="kv-writer", daemon=True)
        self._thread.start()

    def submit(
        self, key: bytes, block: torch.Tensor | bytes | memoryview, source: str | None = None
    ) -> bool:
        """Queue one block; False (dropped) when the staging buffer is full or closed."""
        if isinstance(block, torch.Tensor):
            if tuple(block.shape) != self.layout.block_shape or block.dtype != (
                self.layout.torch_dtype
            ):
                raise ValueError(
                    f"block must be {self.layout.block_shape} {self.layout.dtype}; got "
                    f"{tuple(block.shape)} {block.dtype}"
                )
        elif len(block) != self.layout.block_nbytes:
            raise ValueError(f"block must be {self.layout.block_nbytes} bytes; got {len(block)}")
        with self._cond:
            if self._closing or not self._free_slots:
                return False
            slot = self._free_slots.pop()
        staging = self._staging[slot]
        ready = None
        if isinstance(block, torch.Tensor):
            view = staging.view(self.layout.torch_dtype).view(self.layout.block_shape)
            view.copy_(block, non_blocking=True)
            if block.is_cuda:
                ready = torch.cuda.Event()
                ready.record()
        else:
            staging.numpy()[:] = np.frombuffer(block, dtype=np.uint8)
        with self._cond:
            self._jobs.append(_Job(key, slot, ready, source))
            self._in_flight += 1
            self._cond.notify_all()
        return True

    def submit_blocks(self, keys: list[bytes], kv_cache: torch.Tensor, block_ids: list[int]) -> int:
        """Queue `kv_cache[:, :, block_ids[i]]` under `keys[i]`; returns how many leading
        blocks were taken (the rest are dropped: the staging buffer is full or closed).

        One gather kernel per chunk of blocks and one device-to-host copy per run of
        consecutive staging slots, instead of a temporary, a kernel and a copy per block.
        """
        if len(keys) != len(block_ids):
            raise ValueError(f"keys ({len(keys)}) and block_ids ({len(block_ids)}) differ")
        check_cache(self.layout, kv_cache)
        with self._cond:
            n = 0 if self._closing else min(len(keys), len(self._free_slots))
            slots = sorted(self._free_slots[len(self._free_slots) - n :])
            del self._free_slots[len(self._free_slots) - n :]
        if n == 0:
            return 0
        ids = torch.tensor(block_ids[:n], dtype=torch.long).to(kv_cache.device, non_blocking=True)
        columns = blocks_dim(kv_cache).transpose(0, 1)  # [num_blocks, layers * 2, words]
        staging = as_block_rows(self._staging, self.layout)
        for start in range(0, n, self.gather_blocks):
            end = min(start + self.gather_blocks, n)
            part = ids[start:end]
            # A GPU gathers into its own memory, then one copy per run of staging slots
            # crosses the bus; a CPU gathers straight into the staging slots.
            gathered = columns.index_select(0, part) if kv_cache.is_cuda else None
            for first, last in runs(slots[start:end], lambda a, b: b == a + 1):
                rows = staging[slots[start + first] : slots[start + last - 1] + 1]
                if gathered is None:
                    torch.index_select(columns, 0, part[first:last], out=rows)
                else:
                    rows.copy_(gathered[first:last], non_blocking=True)
        ready = None
        if kv_cache.is_cuda:
            ready = torch.cuda.Event()
            ready.record()
        with self._cond:
            self._jobs.extend(
                _Job(k, slot, ready, None) for k, slot in zip(keys[:n], slots, strict=True)
            )
            self._in_flight += n
            self._cond.notify_all()
        return n

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._closing:
                    self._cond.wait()
                if not self._jobs:
                    return  # closing and drained
                job = self._jobs.popleft()
            try:
                if job.ready is not None:
                    job.ready.synchronize()
                self._store(job.key, self._staging[job.slot], job.source)
            except Exception:
                # The store guards every tier; this keeps the thread alive if it has a bug.
                logger.exception("kv writer: storing block %s failed", job.key.hex()[:16])
            finally:
                with self._cond:
                    self._free_slots.append(job.slot)
                    self._in_flight -= 1
                    self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every submitted block is stored; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._in_flight == 0, timeout)

    def close(self, timeout: float | None = 10.0) -> None:
        """Store what is queued (up to `timeout`), then stop the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)
