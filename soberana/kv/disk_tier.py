"""Local disk tier: one engine's private directory of entry files, evicted LRU."""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import threading
from collections import OrderedDict
from pathlib import Path

from soberana.kv.config import GB
from soberana.kv.entry import HEADER_SIZE, entry_size, stored_identity
from soberana.kv.entry_files import (
    FULL_ERRNOS,
    TEMP_SUFFIX,
    entry_path,
    key_from_name,
    read_whole,
    scan_entries,
    write_atomic,
)
from soberana.kv.layout import KVLayout
from soberana.kv.tier import TierUsage

logger = logging.getLogger(__name__)

LOCK_NAME = ".lock"
# After the filesystem filled up, the capacity is lowered to this fraction of what it held.
FULL_LOW_WATER = 0.9


class DiskTier:
    """Entry files under `directory`, at most `capacity_bytes` of them, least recent evicted.

    The directory belongs to one process at a time (an exclusive lock, released when the
    process dies); the index lives in memory and is rebuilt from the files at start, in
    modification-time order, since a hit refreshes the file's mtime.
    """

    name = "disk"

    def __init__(self, directory: str | Path, capacity_bytes: int, layout: KVLayout) -> None:
        self.root = Path(directory)
        self.capacity_bytes = capacity_bytes
        self.layout = layout
        self.entry_size = entry_size(layout)
        if capacity_bytes < self.entry_size:
            raise ValueError(
                f"disk tier capacity must hold at least one entry of {self.entry_size} bytes; "
                f"got {capacity_bytes} bytes"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock_fd = self._take_directory_lock()
        self._index: OrderedDict[bytes, None] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()
        self._rebuild_index()
        self._fit_free_space()

    def _fit_free_space(self) -> None:
        """Lower the capacity to what the filesystem can hold: our entries plus its free
        space. A full filesystem fails every write; a tier that knows evicts instead."""
        fits = len(self._index) * self.entry_size + shutil.disk_usage(self.root).free
        if fits < self.capacity_bytes:
            logger.warning(
                "kv disk tier %s: --kv-disk-gb is %.2f GB but the filesystem holds only "
                "%.2f GB more of ours; using %.2f GB",
                self.root, self.capacity_bytes / GB, fits / GB, fits * FULL_LOW_WATER / GB,
            )  # fmt: skip
            self.capacity_bytes = max(self.entry_size, int(fits * FULL_LOW_WATER))
            with self._lock:
                self._evict_to(self.capacity_bytes)
    def _take_directory_lock(self) -> int:
        fd = os.open(self.root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RuntimeError(
                f"--kv-disk-dir {self.root} is in use by another process; give each engine "
                "its own disk directory (use --kv-shared-dir for a directory shared by replicas)"
            ) from None
        return fd

    def _rebuild_index(self) -> None:
        """Index the entries a previous run left; remove what this run cannot use."""
        found: list[tuple[float, bytes]] = []
        removed = 0
        for e in scan_entries(self.root):
            key = key_from_name(e.name)
            if key is None:
                if e.name.endswith(TEMP_SUFFIX):  # a writer died before publishing
                    os.unlink(e.path)
                    removed += 1
                continue
            stat = e.stat()
            if stat.st_size != self.entry_size or not self._header_matches(e.path, key):
                # Another model's or layout's entry, or a damaged one: it only takes space.
                os.unlink(e.path)
                removed += 1
                continue
            found.append((stat.st_mtime, key))
        found.sort()
        for _, key in found:
            self._index[key] = None
        self._evict_to(self.capacity_bytes)
        logger.info(
            "disk tier %s: %d entries reused, %d files removed", self.root, len(found), removed
        )

    def _header_matches(self, path: str, key: bytes) -> bool:
        with open(path, "rb") as f:
            return stored_identity(f.read(HEADER_SIZE)) == (self.layout.fingerprint, key)

    def _evict_to(self, limit_bytes: int) -> None:
        while self._index and len(self._index) * self.entry_size > limit_bytes:
            key, _ = self._index.popitem(last=False)
            entry_path(self.root, key).unlink(missing_ok=True)

    def get(self, key: bytes, namespace: str = "") -> bytearray | None:
        with self._lock:
            if key not in self._index:
                return None
            self._index.move_to_end(key)
        path = entry_path(self.root, key)
        data = read_whole(path)
        if data is None:
            with self._lock:
                self._index.pop(key, None)
            return None
        try:
            os.utime(path)  # the mtime is the LRU order a restart rebuilds
        except OSError:
            # Evicted after the read, or a read-only filesystem (EPERM, EROFS): the bytes we
            # hold are whole either way, and only the order after a restart is lost.
            pass
        return data

    def put(self, key: bytes, entry: bytes, namespace: str = "") -> bool:
        if len(entry) != self.entry_size:
            raise ValueError(f"entry must be {self.entry_size} bytes; got {len(entry)}")
        with self._lock:
            if key in self._index:
                self._index.move_to_end(key)
                return False
            self._evict_to(self.capacity_bytes - self.entry_size)
        try:
            write_atomic(entry_path(self.root, key), entry)
        except OSError as e:
            if e.errno not in FULL_ERRNOS:
                raise
            self._shrink_after_full()
            write_atomic(entry_path(self.root, key), entry)
        with self._lock:
            self._index[key] = None
        return True

    def _shrink_after_full(self) -> None:
        """The filesystem filled before our capacity did (others write to it too): keep a
        lower capacity from now on and evict down to it, so writes succeed again."""
        with self._lock:
            held = len(self._index) * self.entry_size
            self.capacity_bytes = max(self.entry_size, int(held * FULL_LOW_WATER))
            self._evict_to(self.capacity_bytes - self.entry_size)
        logger.warning("kv disk tier %s: the filesystem is full; capacity lowered to %.2f GB",
                       self.root, self.capacity_bytes / GB)  # fmt: skip

    def contains_many(self, keys: list[bytes], namespace: str = "") -> list[bool]:
        with self._lock:
            return [k in self._index for k in keys]

    def discard(self, key: bytes, namespace: str = "") -> None:
        with self._lock:
            self._index.pop(key, None)
        entry_path(self.root, key).unlink(missing_ok=True)

    def usage(self) -> TierUsage:
        with self._lock:
            n = len(self._index)
        return TierUsage(n * self.entry_size, self.capacity_bytes, n)

    def close(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = -1
