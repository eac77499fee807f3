"""Faults of the stores under the warehouse: a tier that is down, hung, read-only or full
costs hits, never the engine's serving, and is used again once it recovers."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import threading
import time
from collections import namedtuple
from pathlib import Path

import pytest

from soberana.kv.build import build_warehouse
from soberana.kv.config import KVWarehouseConfig
from soberana.kv.disk_tier import DiskTier
from soberana.kv.entry import encode_entry, entry_size
from soberana.kv.redis_tier import RedisTier
from soberana.kv.shared_dir_tier import SharedDirTier
from tests.kv.helpers import block_bytes, free_port, make_cache, make_hashes, small_layout

LAYOUT = small_layout()
ENTRY = entry_size(LAYOUT)


def put(warehouse, hashes, cache) -> None:
    for i, h in enumerate(hashes):
        assert warehouse.put_async(h, cache[:, :, i])
    assert warehouse.flush(timeout=10)


def wait_for(condition, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


# ---- a tier that was down at start ------------------------------------------------------


def test_a_redis_down_at_start_is_loaded_from_once_it_is_back(start_redis, warehouses):
    port = free_port()
    tier = RedisTier(f"redis://127.0.0.1:{port}/0", LAYOUT, timeout_s=0.5)
    w = warehouses(LAYOUT, shared=[tier], cooldown_s=0.2, upkeep_interval_s=0.2)
    assert w.calibrate(prefill_tokens_per_s=1.0).load_tiers == []  # the probe failed
    start_redis(port=port)
    assert wait_for(lambda: "redis" in w.load_tiers)  # probed again by the upkeep thread
    hashes = make_hashes(LAYOUT, 2)
    cache = make_cache(LAYOUT, 2)
    put(w, hashes, cache)
    assert wait_for(lambda: w.lookup_prefix(hashes) == ["redis", "redis"])
    assert w.get(hashes[1]) == block_bytes(cache, 1)


def test_a_tier_that_is_slow_stays_off_after_upkeep(tmp_path, warehouses):
    """Only failed probes are retried: a measured tier keeps its decision."""
    w = warehouses(LAYOUT, disk=DiskTier(tmp_path, 8 * ENTRY, LAYOUT), upkeep_interval_s=0.1)
    assert w.calibrate(prefill_tokens_per_s=1e15).load_tiers == []
    time.sleep(0.5)
    assert w.reprobe_failed_tiers() == [] and w.load_tiers == set()


# ---- a hung Redis -----------------------------------------------------------------------


class HungServer:
    """A TCP endpoint that accepts connections and never answers (a hung or stopped Redis)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.conns:
            conn.close()


def test_a_hung_redis_never_holds_the_engine_thread(warehouses):
    hung = HungServer()
    try:
        tier = RedisTier(f"redis://127.0.0.1:{hung.port}/0", LAYOUT, timeout_s=2.0)
        w = warehouses(LAYOUT, shared=[tier], cooldown_s=0.5, upkeep_interval_s=0.2)
        hashes = make_hashes(LAYOUT, 4)
        slowest = 0.0
        end = time.monotonic() + 5.0  # two socket timeouts and cooldowns
        while time.monotonic() < end:
            start = time.perf_counter()
            assert w.lookup_prefix(hashes) == []
            w.stats()  # the engine ships stats every few steps
            slowest = max(slowest, time.perf_counter() - start)
            time.sleep(0.01)
        # The client's socket timeout is 2 s: a lookup that did the I/O itself waits it out.
        assert slowest < 1.0, slowest
        assert w.stats().tiers["redis"].errors >= 1
    finally:
        hung.close()


# ---- a read-only disk -------------------------------------------------------------------


def test_a_disk_that_turns_read_only_still_serves_its_blocks(tmp_path, warehouses, monkeypatch):
    w = warehouses(LAYOUT, disk=DiskTier(tmp_path, 8 * ENTRY, LAYOUT))
    w.admission = None  # admit every block: this test is about reads
    hashes = make_hashes(LAYOUT, 3)
    cache = make_cache(LAYOUT, 3)
    put(w, hashes, cache)

    def read_only(path, *args, **kwargs):
        raise PermissionError(errno.EPERM, "Operation not permitted", str(path))

    monkeypatch.setattr(os, "utime", read_only)  # what a read-only remount answers
    assert [w.get(h) for h in hashes] == [block_bytes(cache, i) for i in range(3)]
    assert w.stats().tiers["disk"].errors == 0


def test_a_disk_tier_that_cannot_start_leaves_the_engine_serving(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("a file where the directory should be")
    disk_only = KVWarehouseConfig(disk_dir=str(not_a_dir / "kv"), disk_gb=0.01)
    assert build_warehouse(disk_only, LAYOUT) is None  # no warehouse, no crash
    with_host = KVWarehouseConfig(offload_gb=0.001, disk_dir=str(not_a_dir / "kv"), disk_gb=0.01)
    w = build_warehouse(with_host, LAYOUT)
    try:
        assert w.tier_names == ["host"]
    finally:
        w.close()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only directories")
def test_a_read_only_disk_directory_at_start_leaves_the_engine_serving(tmp_path):
    (tmp_path / "kv").mkdir()
    (tmp_path / "kv").chmod(0o555)
    try:
        config = KVWarehouseConfig(offload_gb=0.001, disk_dir=str(tmp_path / "kv"), disk_gb=0.01)
        w = build_warehouse(config, LAYOUT)
        assert w.tier_names == ["host"]
        w.close()
    finally:
        (tmp_path / "kv").chmod(0o755)


# ---- a full disk ------------------------------------------------------------------------

DiskUsage = namedtuple("DiskUsage", "total used free")


class SmallFilesystem:
    """A filesystem of `limit` bytes under `root`: writes past it fail with ENOSPC, as on a
    full disk. Only file descriptors opened under `root` are affected."""

    def __init__(self, root: Path, limit: int, monkeypatch) -> None:
        self.root = str(root)
        self.limit = limit
        self._write = os.write
        monkeypatch.setattr(os, "write", self.write)
        monkeypatch.setattr(shutil, "disk_usage", self.disk_usage)

    def used(self) -> int:
        return sum(
            os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(self.root)
            for f in files
        )  # fmt: skip

    def disk_usage(self, path) -> DiskUsage:
        if not str(path).startswith(self.root):
            return DiskUsage(1 << 40, 0, 1 << 40)
        return DiskUsage(self.limit, self.used(), max(0, self.limit - self.used()))

    def write(self, fd: int, data) -> int:
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            path = ""
        if path.startswith(self.root) and self.used() + len(data) > self.limit:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self._write(fd, data)


def test_the_disk_tier_fits_its_capacity_to_the_free_space_at_start(tmp_path, monkeypatch):
    SmallFilesystem(tmp_path, 10 * ENTRY, monkeypatch)
    tier = DiskTier(tmp_path, 1000 * ENTRY, LAYOUT)  # asks for far more than there is
    assert tier.capacity_bytes <= 10 * ENTRY
    hashes = make_hashes(LAYOUT, 30)
    cache = make_cache(LAYOUT, 30)
    for i, h in enumerate(hashes):  # never a failed write: the tier evicts first
        assert tier.put(h, encode_entry(LAYOUT, h, block_bytes(cache, i)))
    assert tier.usage().used_bytes <= 10 * ENTRY
    tier.close()


def test_a_disk_that_fills_up_is_answered_by_evicting(tmp_path, monkeypatch, warehouses):
    disk = DiskTier(tmp_path, 100 * ENTRY, LAYOUT)
    w = warehouses(LAYOUT, disk=disk)
    w.admission = None
    fs = SmallFilesystem(tmp_path, 12 * ENTRY, monkeypatch)  # others filled the disk meanwhile
    hashes = make_hashes(LAYOUT, 40)
    cache = make_cache(LAYOUT, 40)
    put(w, hashes, cache)
    assert fs.used() <= 12 * ENTRY
    assert disk.capacity_bytes < 12 * ENTRY
    # The newest blocks made it: writes recovered instead of failing from then on.
    assert [w.get(h) for h in hashes[-3:]] == [block_bytes(cache, i) for i in range(37, 40)]
    assert w.stats().tiers["disk"].blocks_written >= 30


def test_a_shared_directory_that_fills_up_is_answered_by_evicting(tmp_path, monkeypatch):
    tier = SharedDirTier(tmp_path, 100 * ENTRY, LAYOUT)
    fs = SmallFilesystem(tmp_path, 12 * ENTRY, monkeypatch)  # other users filled the volume
    hashes = make_hashes(LAYOUT, 40)
    cache = make_cache(LAYOUT, 40)
    for i, h in enumerate(hashes):  # never a failed write: the tier evicts first
        assert tier.put(h, encode_entry(LAYOUT, h, block_bytes(cache, i)))
    assert fs.used() <= 12 * ENTRY
    assert tier.capacity_bytes < 12 * ENTRY
    assert tier.contains_many(hashes[-3:]) == [True] * 3
