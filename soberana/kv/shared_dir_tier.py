"""Shared-directory tier: entry files on a filesystem that several engines use at once."""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from pathlib import Path

from soberana.kv.config import GB
from soberana.kv.entry import entry_size
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

# Eviction frees down to this fraction of capacity, so that not every write rescans.
LOW_WATER = 0.9


class SharedDirTier:
    """Entry files under `<directory>/<layout namespace>/[t<tenant namespace>/]`, written and
    read by many processes (`namespace.py` says what a tenant namespace is).

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
        stored_entry_size: int | None = None,
    ) -> None:
        self.root = Path(directory)
        self.capacity_bytes = capacity_bytes
        # Sealed entries (codec.py) are larger than checked ones.
        self.entry_size = stored_entry_size or entry_size(layout)
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
        free = shutil.disk_usage(self.root).free
        if self._used_bytes + free < capacity_bytes:
            logger.warning(
                "kv shared dir %s: --kv-shared-gb is %.1f GB but only %.1f GB are free; the "
                "filesystem fills first (a full one is answered by evicting)",
                self.root, capacity_bytes / GB, (self._used_bytes + free) / GB,
            )  # fmt: skip

    def _dir(self, namespace: str) -> Path:
        return self.layout_root / f"t{namespace}" if namespace else self.layout_root

    def get(self, key: bytes, namespace: str = "") -> bytearray | None:
        path = entry_path(self._dir(namespace), key)
        data = read_whole(path)
        if data is not None:
            try:
                os.utime(path)  # mtime is the LRU clock every process evicts by
            except OSError:
                pass  # evicted or replaced meanwhile: the bytes we hold are still whole
        return data

    def put(self, key: bytes, entry: bytes, namespace: str = "") -> bool:
        if len(entry) != self.entry_size:
            raise ValueError(f"entry must be {self.entry_size} bytes; got {len(entry)}")
        path = entry_path(self._dir(namespace), key)
        if path.exists():
            return False
        try:
            write_atomic(path, entry)
        except OSError as e:
            if e.errno not in FULL_ERRNOS:
                raise
            # The filesystem filled before our capacity did: evict below what it holds now
            # and keep that as the limit, then try once more.
            self.scan_and_evict()
            self.capacity_bytes = max(self.entry_size, int(self._used_bytes * LOW_WATER))
            logger.warning("kv shared dir %s is full; capacity lowered to %.2f GB",
                           self.root, self.capacity_bytes / GB)  # fmt: skip
            self.scan_and_evict()
            write_atomic(path, entry)
        self._used_bytes += len(entry)
        self._entries += 1
        if (
            self._used_bytes > self.capacity_bytes
            or time.monotonic() - self._last_scan > self.rescan_interval_s
        ):
            self.scan_and_evict()
        return True

    def contains_many(self, keys: list[bytes], namespace: str = "") -> list[bool]:
        root = self._dir(namespace)
        return [entry_path(root, k).exists() for k in keys]

    def discard(self, key: bytes, namespace: str = "") -> None:
        entry_path(self._dir(namespace), key).unlink(missing_ok=True)

    def scan_and_evict(self) -> None:
        """Measure the whole directory; delete stale temporaries and, over capacity, the
        least recently used entries down to LOW_WATER of capacity."""
        with self._scan_lock:
            now = time.time()
            entries: list[tuple[float, int, str]] = []
            for entry_dir in _entry_dirs(self.root):
                for e in scan_entries(entry_dir):
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


def _entry_dirs(root: Path) -> list[Path]:
    """Every directory of fan-outs: each layout's, and each tenant namespace's in it."""
    dirs = []
    for layout_dir in _subdirs(root):
        dirs.append(Path(layout_dir))
        dirs.extend(Path(d) for d in _subdirs(Path(layout_dir)) if _is_tenant_dir(d))
    return dirs


def _is_tenant_dir(path: str) -> bool:
    return os.path.basename(path).startswith("t") and len(os.path.basename(path)) == 17


def purge_tenant(directory: str | Path, namespace: str) -> int:
    """Delete every entry of one tenant namespace, in every layout; returns files removed."""
    if not namespace:
        raise ValueError("namespace must not be empty (that is every unsalted block)")
    removed = 0
    for layout_dir in _subdirs(Path(directory)):
        tenant_dir = Path(layout_dir) / f"t{namespace}"
        for e in scan_entries(tenant_dir):
            _unlink_quietly(e.path)
            removed += 1
    return removed


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
