"""Local disk tier: LRU under capacity, index rebuilt at start, crashed writers leave nothing."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from soberana.kv.disk_tier import DiskTier
from soberana.kv.entry import decode_entry, encode_entry, entry_size
from soberana.kv.entry_files import entry_path, key_from_name
from tests.kv.helpers import make_hashes, small_layout


def entry_for(layout, key: bytes, fill: int = 0) -> bytes:
    return encode_entry(layout, key, bytes([fill]) * layout.block_nbytes)


def entry_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and key_from_name(p.name)]


def test_round_trip(layout, tmp_path):
    tier = DiskTier(tmp_path, 10 * entry_size(layout), layout)
    key = make_hashes(layout, 1)[0]
    assert tier.put(key, entry_for(layout, key, 5)) is True
    assert bytes(decode_entry(layout, key, tier.get(key))) == bytes([5]) * layout.block_nbytes
    assert tier.put(key, entry_for(layout, key, 5)) is False  # already there: nothing written
    tier.close()


def test_least_recently_used_entries_are_evicted_and_disk_use_stays_under_capacity(
    layout, tmp_path
):
    capacity = 3 * entry_size(layout) + 10
    tier = DiskTier(tmp_path, capacity, layout)
    a, b, c, d, e = make_hashes(layout, 5)
    for key in (a, b, c):
        tier.put(key, entry_for(layout, key))
    assert tier.get(a) is not None
    tier.put(d, entry_for(layout, d))
    tier.put(e, entry_for(layout, e))
    assert tier.contains_many([a, b, c, d, e]) == [True, False, False, True, True]
    on_disk = entry_files(tmp_path)
    assert sorted(p.name for p in on_disk) == sorted(f"{k.hex()}.kv" for k in (a, d, e))
    assert sum(p.stat().st_size for p in on_disk) <= capacity
    assert tier.usage().used_bytes == 3 * entry_size(layout)
    tier.close()


def test_a_restart_reuses_entries_in_their_recency_order(layout, tmp_path):
    tier = DiskTier(tmp_path, 3 * entry_size(layout), layout)
    a, b, c, d = make_hashes(layout, 4)
    for key in (a, b, c):
        tier.put(key, entry_for(layout, key))
        time.sleep(0.02)  # distinct mtimes (the filesystem clock is coarse)
    tier.get(a)  # a becomes the most recent, on disk too
    tier.close()

    restarted = DiskTier(tmp_path, 3 * entry_size(layout), layout)
    assert restarted.contains_many([a, b, c]) == [True, True, True]
    restarted.put(d, entry_for(layout, d))
    assert restarted.contains_many([a, b, c, d]) == [True, False, True, True]
    restarted.close()


def test_a_restart_removes_leftovers_foreign_entries_and_the_excess(layout, tmp_path):
    keys = make_hashes(layout, 4)
    tier = DiskTier(tmp_path, 10 * entry_size(layout), layout)
    for key in keys:
        tier.put(key, entry_for(layout, key))
    tier.close()
    temp = entry_path(tmp_path, keys[0]).with_name(".leftover.12.ab.tmp")
    temp.write_bytes(b"half an entry")
    other = small_layout(model="another-model")
    foreign_key = make_hashes(other, 1)[0]
    entry_path(tmp_path, foreign_key).parent.mkdir(exist_ok=True)
    entry_path(tmp_path, foreign_key).write_bytes(entry_for(other, foreign_key))
    moved = entry_path(tmp_path, keys[1]).read_bytes()  # a sound entry under the wrong name
    renamed = make_hashes(layout, 1, seed=9)[0]
    entry_path(tmp_path, renamed).parent.mkdir(exist_ok=True)
    entry_path(tmp_path, renamed).write_bytes(moved)

    restarted = DiskTier(tmp_path, 2 * entry_size(layout), layout)  # smaller than before
    assert not temp.exists()
    assert not entry_path(tmp_path, foreign_key).exists()
    assert not entry_path(tmp_path, renamed).exists()
    assert len(entry_files(tmp_path)) == 2
    assert restarted.usage().entries == 2
    restarted.close()


def test_one_directory_serves_one_process_at_a_time(layout, tmp_path):
    tier = DiskTier(tmp_path, 4 * entry_size(layout), layout)
    with pytest.raises(RuntimeError, match="in use by another process"):
        DiskTier(tmp_path, 4 * entry_size(layout), layout)
    tier.close()
    DiskTier(tmp_path, 4 * entry_size(layout), layout).close()
