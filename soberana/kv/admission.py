"""Disk admission: write a block to disk only once it has been asked for twice."""

from __future__ import annotations

import threading
from collections import OrderedDict


class SecondSightingAdmission:
    """Counts sightings of block hashes in a bounded ghost set (hashes only, no data).

    Most blocks are never asked for again (one-off prompts); writing them to disk wears the
    device and evicts blocks that are. A block is admitted once a request has asked for it
    a second time while its hash is still remembered: the TinyLFU "doorkeeper" idea,
    with the ghost set bounded by LRU so memory stays fixed (~200 bytes per hash).
    """

    def __init__(self, ghost_capacity: int) -> None:
        if ghost_capacity < 1:
            raise ValueError(f"ghost_capacity must be >= 1; got {ghost_capacity}")
        self.ghost_capacity = ghost_capacity
        self._seen: OrderedDict[bytes, int] = OrderedDict()  # hash -> sightings, oldest first
        self._lock = threading.Lock()

    def record_sightings(self, keys: list[bytes]) -> None:
        """One request asked for these blocks."""
        with self._lock:
            for k in keys:
                self._seen[k] = self._seen.get(k, 0) + 1
                self._seen.move_to_end(k)
            while len(self._seen) > self.ghost_capacity:
                self._seen.popitem(last=False)

    def admits(self, key: bytes) -> bool:
        """Whether the block has been asked for at least twice."""
        with self._lock:
            return self._seen.get(key, 0) >= 2
