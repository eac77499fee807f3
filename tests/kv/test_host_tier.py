"""Host RAM tier: fixed slots, LRU eviction under capacity, blocks being read stay put."""

from __future__ import annotations

import pytest
import torch

from soberana.kv.host_tier import HostTier
from tests.kv.helpers import make_hashes


def payload(layout, value: int) -> torch.Tensor:
    return torch.full((layout.block_nbytes,), value, dtype=torch.uint8)


def test_round_trip(layout):
    tier = HostTier(layout, 4 * layout.block_nbytes)
    key = make_hashes(layout, 1)[0]
    tier.put(key, payload(layout, 7))
    assert tier.get(key) == bytes([7]) * layout.block_nbytes
    assert tier.get(make_hashes(layout, 1, seed=1)[0]) is None


def test_least_recently_used_block_is_evicted_at_capacity(layout):
    tier = HostTier(layout, 3 * layout.block_nbytes + 100)  # room for 3 blocks, not 4
    a, b, c, d = make_hashes(layout, 4)
    for i, key in enumerate((a, b, c)):
        tier.put(key, payload(layout, i))
    assert tier.get(a) is not None  # a is now more recent than b
    tier.put(d, payload(layout, 3))
    assert tier.contains_many([a, b, c, d]) == [True, False, True, True]
    usage = tier.usage()
    assert usage.entries == 3 and usage.used_bytes == 3 * layout.block_nbytes
    assert usage.used_bytes <= usage.capacity_bytes


def test_victims_the_spill_policy_keeps_are_handed_back(layout):
    tier = HostTier(layout, 2 * layout.block_nbytes)
    a, b, c, d = make_hashes(layout, 4)
    tier.put(a, payload(layout, 1))
    tier.put(b, payload(layout, 2))
    assert tier.put(c, payload(layout, 3), spill=lambda key: key == a) == [
        (a, bytes([1]) * layout.block_nbytes)
    ]
    assert tier.put(d, payload(layout, 4), spill=lambda key: key == a) == []  # b not kept


def test_a_block_being_read_is_never_overwritten(layout):
    tier = HostTier(layout, 2 * layout.block_nbytes)
    a, b, c, d = make_hashes(layout, 4)
    tier.put(a, payload(layout, 1))
    tier.put(b, payload(layout, 2))
    slot, view = tier.acquire(a)  # a is being copied out (an asynchronous copy to the GPU)
    tier.get(b)
    tier.put(c, payload(layout, 3))  # a is least recent, but held: b goes instead
    assert tier.contains_many([a, b, c]) == [True, False, True]
    assert bool((view == 1).all())
    tier.release(slot)
    tier.get(c)
    tier.put(d, payload(layout, 4))
    assert tier.contains_many([a, c, d]) == [False, True, True]


def test_putting_a_known_block_only_refreshes_it(layout):
    tier = HostTier(layout, 2 * layout.block_nbytes)
    a, b, c = make_hashes(layout, 3)
    tier.put(a, payload(layout, 1))
    tier.put(b, payload(layout, 2))
    tier.put(a, payload(layout, 9))  # same name, same content by construction: no rewrite
    tier.put(c, payload(layout, 3))
    assert tier.contains_many([a, b, c]) == [True, False, True]
    assert tier.get(a) == bytes([1]) * layout.block_nbytes


def test_a_batch_is_stored_as_if_put_one_block_at_a_time(layout):
    tier = HostTier(layout, 3 * layout.block_nbytes)
    old, *batch = make_hashes(layout, 6)
    tier.put(old, payload(layout, 9))
    kept = []
    stored, spilled = tier.put_many(
        batch, [payload(layout, i) for i in range(5)], spill=lambda key: kept.append(key) or True
    )
    # Five blocks into three slots: the old block and the batch's two oldest give way,
    # each handed to the spill policy with its own bytes.
    assert stored == 3
    assert tier.contains_many([old, *batch]) == [False, False, False, True, True, True]
    assert kept == [old, batch[0], batch[1]]
    assert spilled == [(old, bytes([9]) * layout.block_nbytes),
                       (batch[0], bytes([0]) * layout.block_nbytes),
                       (batch[1], bytes([1]) * layout.block_nbytes)]  # fmt: skip
    assert [tier.get(k) for k in batch[2:]] == [bytes([i]) * layout.block_nbytes for i in (2, 3, 4)]


def test_a_batch_repeating_a_name_stores_it_once(layout):
    tier = HostTier(layout, 4 * layout.block_nbytes)
    a, b = make_hashes(layout, 2)
    stored, _ = tier.put_many(
        [a, b, a], [payload(layout, 1), payload(layout, 2), payload(layout, 1)]
    )
    assert stored == 2 and tier.usage().entries == 2


def test_blocks_stored_in_order_sit_in_consecutive_slots(layout):
    """A returning sequence then loads back in one host-to-device copy per run of slots."""
    tier = HostTier(layout, 8 * layout.block_nbytes)
    keys = make_hashes(layout, 5)
    tier.put_many(keys, [payload(layout, i) for i in range(5)])
    slots = tier.hold(keys)
    assert slots == list(range(slots[0], slots[0] + 5))


def test_memory_is_pinned_exactly_when_cuda_is_available(layout):
    assert HostTier(layout, layout.block_nbytes).pinned == torch.cuda.is_available()


def test_a_capacity_below_one_block_is_refused(layout):
    with pytest.raises(ValueError, match="at least one block of 1024 bytes"):
        HostTier(layout, layout.block_nbytes - 1)
