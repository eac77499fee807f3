"""Shared-directory tier: every process that uses the directory keeps it under capacity, LRU."""

from __future__ import annotations

import time

import pytest

from soberana.kv.entry import decode_entry, encode_entry, entry_size
from soberana.kv.entry_files import key_from_name
from soberana.kv.shared_dir_tier import SharedDirTier
from tests.kv.helpers import make_hashes, small_layout


def entry_for(layout, key: bytes, fill: int = 0) -> bytes:
    return encode_entry(layout, key, bytes([fill]) * layout.block_nbytes)


def entries_on_disk(root) -> list:
    return [p for p in root.rglob("*") if p.is_file() and key_from_name(p.name)]


def test_round_trip(layout, tmp_path):
    tier = SharedDirTier(tmp_path, 1 << 20, layout)
    key = make_hashes(layout, 1)[0]
    assert tier.put(key, entry_for(layout, key, 3)) is True
    assert bytes(decode_entry(layout, key, tier.get(key))) == bytes([3]) * layout.block_nbytes
    assert tier.put(key, entry_for(layout, key, 3)) is False
    assert tier.contains_many([key, make_hashes(layout, 1, seed=5)[0]]) == [True, False]


def test_a_process_sees_blocks_another_process_published(layout, tmp_path):
    replica_a = SharedDirTier(tmp_path, 1 << 20, layout)
    replica_b = SharedDirTier(tmp_path, 1 << 20, layout)
    key = make_hashes(layout, 1)[0]
    replica_a.put(key, entry_for(layout, key, 9))
    assert replica_b.contains_many([key]) == [True]
    assert bytes(decode_entry(layout, key, replica_b.get(key))) == bytes([9]) * layout.block_nbytes


def test_writers_keep_the_directory_under_capacity_between_them(layout, tmp_path):
    capacity = 10 * entry_size(layout)
    replicas = [SharedDirTier(tmp_path, capacity, layout, rescan_interval_s=0) for _ in range(2)]
    for i, key in enumerate(make_hashes(layout, 40)):
        replicas[i % 2].put(key, entry_for(layout, key))
        assert sum(p.stat().st_size for p in entries_on_disk(tmp_path)) <= capacity


def test_a_writer_that_alone_passes_capacity_evicts_at_once(layout, tmp_path):
    capacity = 10 * entry_size(layout)
    tier = SharedDirTier(tmp_path, capacity, layout, rescan_interval_s=1e9)
    for key in make_hashes(layout, 25):
        tier.put(key, entry_for(layout, key))
    assert sum(p.stat().st_size for p in entries_on_disk(tmp_path)) <= capacity
    assert tier.usage().used_bytes <= capacity


def test_a_block_another_process_read_recently_outlives_older_ones(layout, tmp_path):
    capacity = 4 * entry_size(layout)
    writer = SharedDirTier(tmp_path, capacity, layout, rescan_interval_s=0)
    reader = SharedDirTier(tmp_path, capacity, layout)
    old = make_hashes(layout, 4)
    for key in old:
        writer.put(key, entry_for(layout, key))
        time.sleep(0.02)  # distinct mtimes (the filesystem clock is coarse)
    assert reader.get(old[0]) is not None  # the oldest write, but just used by another replica
    time.sleep(0.02)
    new = make_hashes(layout, 1, seed=1)[0]
    writer.put(new, entry_for(layout, new))
    # Over capacity, eviction frees down to 90%: the two least recently used go.
    assert writer.contains_many([*old, new]) == [True, False, False, True, True]


def test_other_layouts_live_apart_and_count_against_the_same_capacity(tmp_path):
    mine, theirs = small_layout(), small_layout(model="another-model")
    capacity = 6 * entry_size(mine)
    tier_mine = SharedDirTier(tmp_path, capacity, mine, rescan_interval_s=0)
    tier_theirs = SharedDirTier(tmp_path, capacity, theirs, rescan_interval_s=0)
    key = make_hashes(mine, 1)[0]
    tier_theirs.put(key, entry_for(theirs, key))  # the same hash, written by another model
    assert tier_mine.contains_many([key]) == [False]
    for k in make_hashes(mine, 8, seed=2):
        tier_mine.put(k, entry_for(mine, k))
    assert tier_theirs.contains_many([key]) == [False]  # the oldest entry of the directory
    assert sum(p.stat().st_size for p in entries_on_disk(tmp_path)) <= capacity


def test_a_capacity_below_one_entry_is_refused(layout, tmp_path):
    with pytest.raises(ValueError, match="at least one entry"):
        SharedDirTier(tmp_path, 100, layout)
