"""Prefix affinity: consistent hashing with bounded load (Mirrokni, Thorup, Zadimoghaddam, 2018).

A conversation's key always hashes to the same point on the ring, so it returns to the replica
whose KV cache holds its prefix; a replica already above `load_factor` times the mean load is
skipped and the walk continues clockwise, which bounds any replica's share of the traffic.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Sequence

from soberana.gateway.backend import BackendState

_POINTS_PER_UNIT_WEIGHT = 64  # virtual nodes; more smooths the split between replicas


def _point(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class HashRing:
    """Ring of virtual nodes over a model's backend names; stable while the names are."""

    def __init__(self, names_and_weights: Sequence[tuple[str, float]]) -> None:
        points: list[tuple[int, str]] = []
        for name, weight in names_and_weights:
            replicas = max(1, round(_POINTS_PER_UNIT_WEIGHT * weight))
            points.extend((_point(f"{name}#{i}".encode()), name) for i in range(replicas))
        points.sort()
        self._hashes = [h for h, _ in points]
        self._names = [n for _, n in points]

    def pick(
        self, key: bytes, group: Sequence[BackendState], load_factor: float
    ) -> BackendState | None:
        """The first backend of `group` clockwise from `key` whose load stays under the bound."""
        if not group or not self._hashes:
            return None
        by_name = {b.name: b for b in group}
        # Capacity per unit weight: ceil(factor * (total load + this request) / total weight).
        total = sum(b.outstanding + b.waiting for b in group) + 1
        per_weight = load_factor * total / sum(b.config.weight for b in group)
        start = bisect.bisect(self._hashes, _point(key))
        n = len(self._names)
        seen: set[str] = set()
        for i in range(n):
            name = self._names[(start + i) % n]
            backend = by_name.get(name)
            if backend is None or name in seen:
                continue
            seen.add(name)
            if backend.outstanding + backend.waiting + 1 <= math.ceil(
                per_weight * backend.config.weight
            ):
                return backend
            if len(seen) == len(by_name):
                break
        return None
