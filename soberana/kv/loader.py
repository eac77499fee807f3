"""The read path's thread: a request's cached prefix is copied into the engine's KV cache."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from soberana.kv.layout import KVLayout

logger = logging.getLogger(__name__)


@dataclass
class BlockSource:
    """A block found in a tier: its payload as `[block_nbytes]` uint8 on the CPU."""

    tier: str
    payload: torch.Tensor
    release: Callable[[], None] | None = None  # called once the copy out of it has finished


def payload_tensor(payload: memoryview) -> torch.Tensor:
    """A uint8 tensor over a checked payload; read-only buffers (Redis replies) are copied
    first, since torch only wraps writable memory."""
    if payload.readonly:
        payload = memoryview(bytearray(payload))
    return torch.frombuffer(payload, dtype=torch.uint8)


# Yields a source for each leading block it can serve, in order; closing it early releases
# what it still holds.
SourcesFn = Callable[[list[bytes]], Iterator[BlockSource]]


class LoadHandle:
    """One request's load. The engine polls `done()` between steps; `num_loaded` leading
    blocks are then valid in the cache (fewer than asked when a block vanished or failed its
    check). The destination blocks must stay allocated until `done()`, even after `cancel()`.
    """

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.num_loaded = 0
        self.tiers: list[str] = []  # where each loaded block came from
        self._finished = threading.Event()
        self._cancelled = threading.Event()

    def done(self) -> bool:
        return self._finished.is_set()

    def wait(self, timeout: float | None = None) -> int | None:
        """Blocks loaded, once done; None on timeout."""
        return self.num_loaded if self._finished.wait(timeout) else None

    def cancel(self) -> None:
        """Stop after the block being copied (the request was aborted)."""
        self._cancelled.set()


@dataclass
class _Job:
    handle: LoadHandle
    block_hashes: list[bytes]
    kv_cache: torch.Tensor
    block_ids: list[int]
    after: torch.cuda.Event | None  # the caller's stream position the copies must follow
    submitted: float


class BlockLoader:
    """One thread that serves loads in order. On a GPU the copies run on the thread's own
    stream, after everything the caller had queued when it asked (the destination blocks may
    have just been freed by a kernel still running), and the job is done once they land."""

    def __init__(
        self, layout: KVLayout, sources: SourcesFn, finished: Callable[[LoadHandle, float], None]
    ) -> None:
        self.layout = layout
        self._sources = sources
        self._finished = finished
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._thread = threading.Thread(target=self._run, name="kv-loader", daemon=True)
        self._thread.start()

    def submit(
        self, block_hashes: list[bytes], kv_cache: torch.Tensor, block_ids: list[int]
    ) -> LoadHandle:
        """Start loading `block_hashes[i]` into `kv_cache[:, :, block_ids[i]]`."""
        if len(block_hashes) != len(block_ids):
            raise ValueError(
                f"block_hashes ({len(block_hashes)}) and block_ids ({len(block_ids)}) differ"
            )
        shape = tuple(kv_cache.shape)
        if shape[:2] + shape[3:] != self.layout.block_shape or (
            kv_cache.dtype != self.layout.torch_dtype
        ):
            raise ValueError(f"kv_cache {shape} {kv_cache.dtype} does not match {self.layout}")
        after = None
        if kv_cache.is_cuda:
            after = torch.cuda.Event()
            after.record()
        handle = LoadHandle(len(block_hashes))
        job = _Job(handle, list(block_hashes), kv_cache, list(block_ids), after, time.monotonic())
        self._jobs.put(job)
        return handle

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                self._load(job)
            except Exception:
                logger.exception("kv loader: load of %d blocks failed", len(job.block_hashes))
                job.handle.num_loaded = 0  # blocks may be half written: nothing is valid
            finally:
                try:  # counted before the engine can see the load done
                    self._finished(job.handle, time.monotonic() - job.submitted)
                finally:
                    job.handle._finished.set()

    def _load(self, job: _Job) -> None:
        stream = None
        if job.kv_cache.is_cuda:
            device = job.kv_cache.device
            stream = self._streams.get(device) or torch.cuda.Stream(device)
            self._streams[device] = stream
        sources: list[BlockSource] = []
        blocks = self._sources(job.block_hashes)
        try:
            with torch.inference_mode(), torch.cuda.stream(stream):
                if job.after is not None:
                    stream.wait_event(job.after)
                for source, block_id in zip(blocks, job.block_ids, strict=False):
                    sources.append(source)
                    payload = source.payload.view(self.layout.torch_dtype)
                    job.kv_cache[:, :, block_id].copy_(
                        payload.view(self.layout.block_shape), non_blocking=True
                    )
                    if job.handle._cancelled.is_set():
                        break
                if stream is not None:
                    stream.synchronize()
        finally:
            blocks.close()
            for source in sources:
                if source.release is not None:
                    source.release()
        job.handle.tiers = [s.tier for s in sources]
        job.handle.num_loaded = len(sources)

    def close(self, timeout: float | None = 10.0) -> None:
        """Finish the loads already asked for, then stop the thread."""
        self._jobs.put(None)
        self._thread.join(timeout)
