"""Shared-directory tier: entry files on a filesystem that several engines use at once."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from soberana.kv.entry import entry_size
from soberana.kv.entry_files import (
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

# Eviction frees down to this fraction of capacity, so that not every write rescans.
LOW_WATER = 0.9


class SharedDirTier:
    """Entry files under `<directory>/<layout namespace>/`, written and read by many processes.

    Nothing is coordinated but the filesystem: writers publish by atomic rename, readers
    check every entry (the warehouse does), a hit refreshes the file's mtime, and any
    process that finds the directory over `capacity_bytes` deletes the oldest-mtime files,
    across every layout in the directory. Each process sees others' writes only at its next
    scan, so usage can overshoot by what others wrote since (a soft limit); it rescans every
    `rescan_interval_s` and whenever its own writes alone pass the limit.
    """

    name = "shared_dir"

    def __init__(
        self,
        directory: str | Path,
        capacity_bytes: int,
        layout: KVLayout,
        rescan_interval_s: float = 30.0,
        stale_temp_s: float = 600.0,
    ) -> None:
        self.root = Path(directory)
        self.capacity_bytes = capacity_bytes
        self.entry_size = entry_size(layout)
        if capacity_bytes < self.entry_size:
            raise ValueError(
                f"shared dir capacity must hold at least one entry of {self.entry_size} bytes; "
                f"got {capacity_bytes} bytes"
            )
        self.layout_root = self.root / layout.namespace
        self.layout_root.mkdir(parents=True, exist_ok=True)
        self.rescan_interval_s = rescan_interval_s
        # A temporary file this old belongs to a writer that died: no write takes minutes.
        self.stale_temp_s = stale_temp_s
        self._used_bytes = 0  # as of the last scan, plus this process's writes since
        self._entries = 0
        self._last_scan = 0.0
        self._scan_lock = threading.Lock()
        self.scan_and_evict()

    def get(self, key: bytes) -> bytearray | None:
        path = entry_path(self.layout_root, key)
        data = read_whole(path)
        if data is not None:
            try:
                os.utime(path)  # mtime is the LRU clock every process evicts by
            except OSError:
                pass  # evicted or replaced meanwhile: the bytes we hold are still whole
        return data

    def put(self, key: bytes, entry: bytes) -> bool:
        if len(entry) != self.entry_size:
            raise ValueError(f"entry must be {self.entry_size} bytes; got {len(entry)}")
        path = entry_path(self.layout_root, key)
        if path.exists():
            return False
        write_atomic(path, entry)
        self._used_bytes += len(entry)
        self._entries += 1
        if (
            self._used_bytes > self.capacity_bytes
            or time.monotonic() - self._last_scan > self.rescan_interval_s
        ):
            self.scan_and_evict()
        return True

    def contains_many(self, keys: list[bytes]) -> list[bool]:
        return [entry_path(self.layout_root, k).exists() for k in keys]

    def discard(self, key: bytes) -> None:
        entry_path(self.layout_root, key).unlink(missing_ok=True)

    def scan_and_evict(self) -> None:
        """Measure the whole directory; delete stale temporaries and, over capacity, the
        least recently used entries down to LOW_WATER of capacity."""
        with self._scan_lock:
            now = time.time()
            entries: list[tuple[float, int, str]] = []
            for layout_dir in _subdirs(self.root):
                for e in scan_entries(Path(layout_dir)):
                    try:
                        stat = e.stat()
                    except FileNotFoundError:
                        continue
                    if key_from_name(e.name) is not None:
                        entries.append((stat.st_mtime, stat.st_size, e.path))
                    elif e.name.endswith(TEMP_SUFFIX) and now - stat.st_mtime > self.stale_temp_s:
                        _unlink_quietly(e.path)
            used = sum(size for _, size, _ in entries)
            count = len(entries)
            if used > self.capacity_bytes:
                entries.sort()
                target = self.capacity_bytes * LOW_WATER
                for _, size, path in entries:
                    if used <= target:
                        break
                    _unlink_quietly(path)
                    used -= size
                    count -= 1
                logger.debug("shared dir %s evicted down to %d bytes", self.root, used)
            self._used_bytes, self._entries = used, count
            self._last_scan = time.monotonic()

    def usage(self) -> TierUsage:
        return TierUsage(self._used_bytes, self.capacity_bytes, self._entries)

    def close(self) -> None:
        """Nothing is held open between calls."""


def _subdirs(root: Path) -> list[str]:
    try:
        return [e.path for e in os.scandir(root) if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return []


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass  # another process evicted it first
