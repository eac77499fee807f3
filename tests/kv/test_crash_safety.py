"""A writer process killed with SIGKILL at any point leaves nothing readable but whole entries."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from soberana.kv.disk_tier import DiskTier
from soberana.kv.entry import decode_entry
from soberana.kv.entry_files import key_from_name
from soberana.kv.redis_tier import RedisTier
from soberana.kv.shared_dir_tier import SharedDirTier
from tests.kv.helpers import big_layout, expect_line, kill_child, make_hashes, spawn_child

LAYOUT = big_layout()  # 1 MiB entries: writes long enough to be interrupted


def open_tier(kind: str, root: Path) -> DiskTier | SharedDirTier:
    """What the next process to start sees."""
    if kind == "disk":
        return DiskTier(root, 1 << 30, LAYOUT)
    return SharedDirTier(root, 1 << 30, LAYOUT, stale_temp_s=3600)


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".tmp")]


def entry_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and key_from_name(p.name)]


@pytest.mark.parametrize("kind", ["disk", "shared"])
@pytest.mark.parametrize("stage", ["mid-write", "before-rename"])
def test_a_writer_killed_while_writing_leaves_nothing_readable(tmp_path, kind, stage):
    key = make_hashes(LAYOUT, 1)[0]
    child = spawn_child("killed_writer.py", kind, str(tmp_path), stage)
    try:
        expect_line(child, "stalled")
        assert temp_files(tmp_path), "the writer was not caught mid-write"
    finally:
        kill_child(child)
    tier = open_tier(kind, tmp_path)
    assert tier.contains_many([key]) == [False]
    assert tier.get(key) is None
    assert entry_files(tmp_path) == []
    if kind == "disk":
        assert temp_files(tmp_path) == []  # the private directory is cleaned at start
    tier.close()


@pytest.mark.parametrize("kind", ["disk", "shared"])
def test_every_entry_a_killed_writer_published_is_whole(tmp_path, kind):
    child = spawn_child("killed_writer.py", kind, str(tmp_path), "loop")
    try:
        expect_line(child, "published")
        time.sleep(0.2)  # the kill lands at an arbitrary point of some later write
    finally:
        kill_child(child)
    tier = open_tier(kind, tmp_path)
    files = entry_files(tmp_path)
    assert files
    assert tier.usage().entries == len(files)
    for path in files:
        key = key_from_name(path.name)
        assert decode_entry(LAYOUT, key, tier.get(key)) is not None, path
    tier.close()


def test_a_shared_dir_scan_removes_only_temporaries_old_enough_to_be_abandoned(tmp_path):
    child = spawn_child("killed_writer.py", "shared", str(tmp_path), "mid-write")
    try:
        expect_line(child, "stalled")
    finally:
        kill_child(child)
    [temp] = temp_files(tmp_path)
    SharedDirTier(tmp_path, 1 << 30, LAYOUT, stale_temp_s=3600).close()
    assert temp.exists()  # could still be a live writer on another host
    SharedDirTier(tmp_path, 1 << 30, LAYOUT, stale_temp_s=0).close()
    assert not temp.exists()


def test_a_redis_writer_killed_mid_set_leaves_no_key(start_redis):
    server = start_redis()
    key = make_hashes(LAYOUT, 1)[0]
    child = spawn_child("killed_writer.py", "redis", server.url, "mid-write")
    try:
        expect_line(child, "stalled")
        deadline = time.monotonic() + 10
        while not any(  # the server holds half a SET from the writer when it dies
            c["cmd"] == "NULL" and int(c["qbuf"]) >= LAYOUT.block_nbytes // 2
            for c in server.client.client_list()
        ):
            assert time.monotonic() < deadline, "the server never saw the partial SET"
            time.sleep(0.02)
    finally:
        kill_child(child)
    tier = RedisTier(server.url, LAYOUT)
    assert tier.contains_many([key]) == [False]
    assert tier.get(key) is None
    assert server.client.dbsize() == 0
    tier.close()
