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

# Stores a batch: (block hashes, payloads as [block_nbytes] uint8 rows, per block the source
# tier or None for the engine's blocks, per block the tenant namespace).
StoreFn = Callable[[list[bytes], list[torch.Tensor], list["str | None"], list[str]], None]

# Blocks the thread stores per call. Each torch call the thread makes lets the GIL go and must
# win it back from the engine's busy thread (up to a switch interval, 5 ms), so a call per
# block capped the thread at ~100 blocks/s; a batch pays that once.
STORE_BATCH = 256


@dataclass
class _Job:
    key: bytes
    slot: int
    ready: torch.cuda.Event | None  # set when the copy off the GPU is still in flight
    source: str | None
    namespace: str = ""


class BlockWriter:
    """A fixed staging buffer of block-sized slots (pinned on CUDA hosts) and one thread.

    `submit` takes a free slot, starts the copy into it and returns; with no free slot it
    drops the block. The buffer is the queue bound: memory is fixed and the caller never
    waits on a slow tier. On a GPU, `submit_blocks` gathers the blocks into device memory on
    the caller's current stream (so before any later kernel there overwrites them) and
    copies them off the GPU on a stream of its own, so the caller's next kernels do not
    queue behind the bus.
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
        self._copy_streams: dict[torch.device, torch.cuda.Stream] = {}  # device-to-host copies
        self._jobs: deque[_Job] = deque()
        self._in_flight = 0  # submitted and not yet stored
        self._closing = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="kv-writer", daemon=True)
        self._thread.start()

    def submit(
        self,
        key: bytes,
        block: torch.Tensor | bytes | memoryview,
        source: str | None = None,
        namespace: str = "",
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
            self._jobs.append(_Job(key, slot, ready, source, namespace))
            self._in_flight += 1
            self._cond.notify_all()
        return True

    def submit_blocks(
        self,
        keys: list[bytes],
        kv_cache: torch.Tensor,
        block_ids: list[int],
        namespaces: list[str] | None = None,
    ) -> int:
        """Queue `kv_cache[:, :, block_ids[i]]` under `keys[i]` (tenant namespace
        `namespaces[i]`, default none); returns how many leading
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
        copy_stream = self._copy_stream(kv_cache.device) if kv_cache.is_cuda else None
        taken = n
        for start in range(0, n, self.gather_blocks):
            end = min(start + self.gather_blocks, n)
            part = ids[start:end]
            if copy_stream is None:  # a CPU gathers straight into the staging slots
                for first, last in runs(slots[start:end], lambda a, b: b == a + 1):
                    rows = staging[slots[start + first] : slots[start + last - 1] + 1]
                    torch.index_select(columns, 0, part[first:last], out=rows)
                continue
            gathered = _gather_on_device(columns, part, copy_stream)
            if gathered is None:
                taken = start
                break
            with torch.cuda.stream(copy_stream):
                for first, last in runs(slots[start:end], lambda a, b: b == a + 1):
                    rows = staging[slots[start + first] : slots[start + last - 1] + 1]
                    rows.copy_(gathered[first:last], non_blocking=True)
        ready = None
        if copy_stream is not None:
            ready = torch.cuda.Event()
            ready.record(copy_stream)
        with self._cond:
            self._free_slots.extend(slots[taken:])
            self._jobs.extend(
                _Job(k, slot, ready, None, ns)
                for k, slot, ns in zip(keys[:taken], slots, namespaces or [""] * taken,
                                       strict=False)  # fmt: skip
            )
            self._in_flight += taken
            self._cond.notify_all()
        return taken

    def _copy_stream(self, device: torch.device) -> torch.cuda.Stream:
        stream = self._copy_streams.get(device)
        if stream is None:
            stream = self._copy_streams[device] = torch.cuda.Stream(device)
        return stream

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._closing:
                    self._cond.wait()
                if not self._jobs:
                    return  # closing and drained
                batch = [self._jobs.popleft() for _ in range(min(len(self._jobs), STORE_BATCH))]
            try:
                events = {id(j.ready): j.ready for j in batch if j.ready is not None}
                for event in events.values():
                    event.synchronize()
                self._store([j.key for j in batch], [self._staging[j.slot] for j in batch],
                            [j.source for j in batch], [j.namespace for j in batch])  # fmt: skip
            except Exception:
                # The store guards every tier; this keeps the thread alive if it has a bug.
                logger.exception("kv writer: storing %d blocks failed", len(batch))
            finally:
                with self._cond:
                    self._free_slots.extend(j.slot for j in batch)
                    self._in_flight -= len(batch)
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


def _gather_on_device(
    columns: torch.Tensor, ids: torch.Tensor, copy_stream: torch.cuda.Stream
) -> torch.Tensor | None:
    """`columns[ids]` gathered on the current stream, readable from `copy_stream` (which
    waits for the gather), or None when the device has no memory left for it.

    The temporary is held until the copy stream is done with it (`record_stream`); what is in
    flight is bounded by the host staging buffer. Out of memory, the copies in flight are
    waited for once (their temporaries are then free) before giving up: the blocks are then
    dropped, never the engine's step.
    """
    for attempt in range(2):
        try:
            gathered = columns.index_select(0, ids)
            break
        except torch.OutOfMemoryError:
            if attempt:
                logger.warning("kv writer: no device memory to gather %d blocks", len(ids))
                return None
            copy_stream.synchronize()
            torch.cuda.empty_cache()
    gathered.record_stream(copy_stream)
    copy_stream.wait_stream(torch.cuda.current_stream())
    return gathered
