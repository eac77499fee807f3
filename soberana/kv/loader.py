"""The read path's thread: a request's cached prefix is copied into the engine's KV cache."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch

from soberana.kv.layout import KVLayout

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class BlockSource:
    """A block found in a tier: its payload as `[block_nbytes]` uint8 on the CPU, or (host
    tier) row `slot` of a slab `[num_slots, block_nbytes]`, read in runs of consecutive rows.
    """

    tier: str
    payload: torch.Tensor | None
    release: Callable[[], None] | None = None  # called once the copy out of it has finished
    slab: torch.Tensor | None = None
    slot: int = 0


def payload_tensor(payload: memoryview) -> torch.Tensor:
    """A uint8 tensor over a checked payload; read-only buffers (Redis replies) are copied
    first, since torch only wraps writable memory."""
    if payload.readonly:
        payload = memoryview(bytearray(payload))
    return torch.frombuffer(payload, dtype=torch.uint8)


# (block hashes, tenant namespace) -> a source for each leading block it can serve, in
# order; closing it early releases what it still holds.
SourcesFn = Callable[[list[bytes], str], Iterator[BlockSource]]


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
        # A load issued from the engine's thread: its copies' end on the device, and what
        # to do once they have landed (release the sources, count, mark done).
        self._in_flight: tuple[torch.cuda.Event, Callable[[], None]] | None = None

    def done(self) -> bool:
        if self._in_flight is not None and self._in_flight[0].query():
            self._land()
        return self._finished.is_set()

    def wait(self, timeout: float | None = None) -> int | None:
        """Blocks loaded, once done; None on timeout."""
        if self._in_flight is not None:
            self._in_flight[0].synchronize()
            self._land()
        return self.num_loaded if self._finished.wait(timeout) else None

    def _land(self) -> None:
        _, finish = self._in_flight
        self._in_flight = None
        finish()

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
    namespace: str = ""


# A load batch between the tiers' payloads and a GPU's cache (128 MiB: 64 blocks of the
# Llama-3.1-8B shape; a load pipeline holds two); the writer's gathers are bounded by the
# same size. A block's place
# in the cache, kv_cache[:, :, b], is 2 * layers strided pieces, so a copy per block would cost
# a temporary and a kernel each; instead each batch is copied in contiguously and placed with
# one scatter.
STAGING_BYTES = 128 << 20


class _Pipeline:
    """A GPU's path from pinned host memory into the cache: two staging buffers, an upload
    stream and a placing stream. Batch i is uploaded into buffer i % 2 while batch i - 1 is
    placed (scattered into the cache) from the other; each buffer is reused only once the
    scatter reading it has run."""

    def __init__(self, device: torch.device, rows: int, layout: KVLayout) -> None:
        self.upload = torch.cuda.Stream(device)
        self.place = torch.cuda.Stream(device)
        # Allocated once at full size (a buffer freed while a copy reads it could be reused).
        self.buffers = []
        for _ in range(2):
            raw = torch.empty((rows, layout.block_nbytes), dtype=torch.uint8, device=device)
            self.buffers.append((raw, as_block_rows(raw, layout)))
        self._free_after: list[torch.cuda.Event | None] = [None, None]  # last scatter of each
        self._current = 1

    def next_buffer(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next staging buffer ([rows, block_nbytes] bytes and its `as_block_rows` view);
        the upload stream waits for the scatter that last read it."""
        self._current = 1 - self._current
        free = self._free_after[self._current]
        if free is not None:
            self.upload.wait_event(free)
        return self.buffers[self._current]

    def place_after_upload(self, after: torch.cuda.Event | None) -> None:
        """The placing stream waits for the uploads queued so far (and for `after`)."""
        uploaded = torch.cuda.Event()
        uploaded.record(self.upload)
        self.place.wait_event(uploaded)
        if after is not None:
            self.place.wait_event(after)

    def placed(self) -> None:
        """Mark the current buffer free once the scatter just queued on `place` has run."""
        done = torch.cuda.Event()
        done.record(self.place)
        self._free_after[self._current] = done


class BlockLoader:
    """One thread that serves loads in order. On a GPU the copies run on the thread's own
    stream, after everything the caller had queued when it asked (the destination blocks may
    have just been freed by a kernel still running), and the job is done once they land.

    On a GPU each batch of blocks costs one host-to-device copy per run of consecutive host
    slots (the pool evicts a sequence's blocks in order, so they sit in a run) or per block
    from another tier, then one scatter into the cache.
    """

    def __init__(
        self,
        layout: KVLayout,
        sources: SourcesFn,
        finished: Callable[[LoadHandle, float], None],
        staging_bytes: int = STAGING_BYTES,
    ) -> None:
        self.layout = layout
        self.batch_blocks = max(1, staging_bytes // layout.block_nbytes)
        self._sources = sources
        self._finished = finished
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        # Per (device, issued by the loader thread): the GPU copy pipeline.
        self._pipes: dict[tuple[torch.device, bool], _Pipeline] = {}
        self._thread = threading.Thread(target=self._run, name="kv-loader", daemon=True)
        self._thread.start()

    def submit(
        self,
        block_hashes: list[bytes],
        kv_cache: torch.Tensor,
        block_ids: list[int],
        inline: bool = False,
        namespace: str = "",
    ) -> LoadHandle:
        """Start loading `block_hashes[i]` into `kv_cache[:, :, block_ids[i]]`.

        `inline` (a GPU cache, every block in host RAM): the copies are issued from the
        calling thread and the handle is done once they land on the device. The loader thread
        would need the GIL back after each of its torch calls while the engine's thread runs
        Python: beside a busy thread that cost 1.7 s for a 470 MB load that takes 10 ms alone
        (benchmarks/gpu/kv_transfer.py on an H200).
        """
        if len(block_hashes) != len(block_ids):
            raise ValueError(
                f"block_hashes ({len(block_hashes)}) and block_ids ({len(block_ids)}) differ"
            )
        check_cache(self.layout, kv_cache)
        after = None
        if kv_cache.is_cuda:
            after = torch.cuda.Event()
            after.record()
        handle = LoadHandle(len(block_hashes))
        job = _Job(handle, list(block_hashes), kv_cache, list(block_ids), after, time.monotonic(),
                   namespace)  # fmt: skip
        if inline and kv_cache.is_cuda:
            self._start_inline(job)
        else:
            self._jobs.put(job)
        return handle

    def _start_inline(self, job: _Job) -> None:
        sources: list[BlockSource] = []
        try:
            stream = self._issue(job, sources)
            landed = torch.cuda.Event()
            landed.record(stream)
        except Exception:
            logger.exception("kv loader: load of %d blocks failed", len(job.block_hashes))
            job.handle.num_loaded = 0  # blocks may be half written: nothing is valid
            landed = torch.cuda.Event()
            landed.record()

        def finish() -> None:
            try:
                self._release(job, sources)
                self._finished(job.handle, time.monotonic() - job.submitted)
            finally:
                job.handle._finished.set()

        job.handle._in_flight = (landed, finish)

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
        # Torch calls release and retake the GIL, which the engine thread holds through its
        # Python: calls here are per load, per batch and per run of host slots, not per block.
        sources: list[BlockSource] = []
        try:
            stream = self._issue(job, sources)
            if stream is not None:
                stream.synchronize()
        finally:
            self._release(job, sources)

    def _issue(self, job: _Job, sources: list[BlockSource]) -> torch.cuda.Stream | None:
        """Queue the copies of the job's blocks; the sources read are appended to `sources`.
        Returns the stream whose queued work ends the load (None on a CPU)."""
        device = job.kv_cache.device
        pipe = None
        if job.kv_cache.is_cuda:
            # The loader thread and inline loads each have their own pipeline: copies issued
            # from two threads into one staging buffer could interleave.
            key = (device, threading.current_thread() is self._thread)
            pipe = self._pipes.get(key) or _Pipeline(device, self.batch_blocks, self.layout)
            self._pipes[key] = pipe
        blocks = self._sources(job.block_hashes, job.namespace)
        try:
            with torch.inference_mode(), torch.cuda.stream(pipe.upload if pipe else None):
                ids = torch.tensor(job.block_ids, dtype=torch.long).to(device, non_blocking=True)
                if pipe is not None:
                    ids.record_stream(pipe.place)
                columns = blocks_dim(job.kv_cache)
                start = 0  # sources[start:] are read but not yet copied
                for source in blocks:
                    sources.append(source)
                    if len(sources) - start == self.batch_blocks:
                        self._copy_in(columns, pipe, sources[start:], ids[start:], job)
                        start = len(sources)
                        if job.handle._cancelled.is_set():
                            break
                if len(sources) > start:
                    self._copy_in(columns, pipe, sources[start:], ids[start:], job)
        finally:
            blocks.close()
        return pipe.place if pipe else None

    def _release(self, job: _Job, sources: list[BlockSource]) -> None:
        """The copies out of `sources` have landed: let the tiers reuse them; count them."""
        for source in sources:
            if source.release is not None:
                source.release()
        job.handle.tiers = [s.tier for s in sources]
        job.handle.num_loaded = len(sources)

    def _copy_in(
        self,
        columns: torch.Tensor,
        pipe: _Pipeline | None,
        batch: list[BlockSource],
        ids: torch.Tensor,
        job: _Job,
    ) -> None:
        """Copy `batch` to the cache's blocks `ids[i]` (`columns` is `blocks_dim` of the
        cache): on a GPU through one of `pipe`'s staging buffers, then one scatter; on a CPU
        each run straight from where it is."""
        if pipe is None:
            for first, end in runs(batch, _next_row):
                s = batch[first]
                src = s.payload[None] if s.slab is None else s.slab[s.slot : s.slot + end - first]
                columns.index_copy_(
                    1, ids[first:end], as_block_rows(src, self.layout).transpose(0, 1)
                )
            return
        raw, rows = pipe.next_buffer()  # the current stream (upload) waits until it is free
        for first, end in runs(batch, _next_row):
            s = batch[first]
            src = s.payload[None] if s.slab is None else s.slab[s.slot : s.slot + end - first]
            raw[first:end].copy_(src, non_blocking=True)
        # Only the scatter waits for the caller's stream (a freed block may still be written
        # by the step in flight); the uploads of later batches go on meanwhile.
        pipe.place_after_upload(job.after)
        job.after = None
        n = len(batch)
        with torch.cuda.stream(pipe.place):
            columns.index_copy_(1, ids[:n], rows[:n].transpose(0, 1))
        pipe.placed()

    def close(self, timeout: float | None = 10.0) -> None:
        """Finish the loads already asked for, then stop the thread."""
        self._jobs.put(None)
        self._thread.join(timeout)


def check_cache(layout: KVLayout, kv_cache: torch.Tensor) -> None:
    """Raise ValueError unless `kv_cache` is a contiguous engine cache of `layout`."""
    shape = tuple(kv_cache.shape)
    if shape[:2] + shape[3:] != layout.block_shape or kv_cache.dtype != layout.torch_dtype:
        raise ValueError(f"kv_cache {shape} {kv_cache.dtype} does not match {layout}")
    if not kv_cache.is_contiguous():
        raise ValueError("kv_cache must be contiguous (the engine's cache tensor)")


def blocks_dim(kv_cache: torch.Tensor) -> torch.Tensor:
    """A view `[layers * 2, num_blocks, words]` of the cache's bytes: a block is a column.

    Words are the widest integer type that divides a row (copies move bytes, never values,
    and integer kernels exist on every device and for every cache dtype, float8 included).
    """
    num_layers, kv, num_blocks = kv_cache.shape[:3]
    raw = kv_cache.view(torch.uint8)
    return raw.view(_word_dtype(raw.shape[-1])).view(num_layers * kv, num_blocks, -1)


def as_block_rows(staging: torch.Tensor, layout: KVLayout) -> torch.Tensor:
    """`[n, block_nbytes]` uint8 staging as `[n, layers * 2, words]`, matching `blocks_dim`."""
    word = _word_dtype(layout.head_dim * layout.torch_dtype.itemsize)
    return staging.view(word).view(staging.shape[0], 2 * layout.num_layers, -1)


def _word_dtype(last_dim_bytes: int) -> torch.dtype:
    for dtype in (torch.int64, torch.int32, torch.int16):
        if last_dim_bytes % dtype.itemsize == 0:
            return dtype
    return torch.uint8


def runs(items: list[T], follows: Callable[[T, T], bool]) -> Iterator[tuple[int, int]]:
    """`(first, end)` index ranges of items each of which `follows` the one before: each
    run is one copy (payloads adjacent in one allocation, consecutive staging slots)."""
    first = 0
    for i in range(1, len(items) + 1):
        if i == len(items) or not follows(items[i - 1], items[i]):
            yield first, i
            first = i


def _next_row(a: BlockSource, b: BlockSource) -> bool:
    return a.slab is not None and b.slab is a.slab and b.slot == a.slot + 1
