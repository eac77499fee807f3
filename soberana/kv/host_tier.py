"""Host RAM tier: fixed-size slots in one (pinned, on CUDA hosts) slab, evicted LRU."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

import torch

from soberana.kv.layout import KVLayout
from soberana.kv.tier import TierUsage


class HostTier:
    """Block payloads in RAM. Every block has the same size, so the slab is cut into slots
    once and never fragments; pinned memory lets host-to-GPU copies run asynchronously.

    Entries live only in this process, so they are kept as raw payloads, not checked entries.
    """

    name = "host"

    def __init__(
        self, layout: KVLayout, capacity_bytes: int, pin_memory: bool | None = None
    ) -> None:
        self.block_nbytes = layout.block_nbytes
        self.num_slots = capacity_bytes // self.block_nbytes
        if self.num_slots < 1:
            raise ValueError(
                f"host tier capacity must hold at least one block of {self.block_nbytes} "
                f"bytes; got {capacity_bytes} bytes"
            )
        self.pinned = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._slab = torch.empty(
            (self.num_slots, self.block_nbytes), dtype=torch.uint8, pin_memory=self.pinned
        )
        self._index: OrderedDict[bytes, int] = OrderedDict()  # key -> slot, least recent first
        # Popped from the end: ascending, so a sequence's blocks stored in order sit in
        # consecutive slots and load back in one copy per run.
        self._free_slots = list(range(self.num_slots - 1, -1, -1))
        # slot -> readers copying out of it; such a slot is never reused under them.
        self._readers: dict[int, int] = {}
        self._lock = threading.Lock()

    def contains_many(self, keys: list[bytes], touch: bool = False) -> list[bool]:
        """Presence of each key; with `touch`, found blocks become the most recently used
        (a request is about to load them: keep them until it does)."""
        with self._lock:
            found = [k in self._index for k in keys]
            if touch:
                for k, hit in zip(keys, found, strict=True):
                    if hit:
                        self._index.move_to_end(k)
            return found

    def put(
        self,
        key: bytes,
        payload: torch.Tensor,
        spill: Callable[[bytes], bool] | None = None,
    ) -> list[tuple[bytes, bytes]]:
        """Store a `[block_nbytes]` uint8 payload; returns evicted blocks that `spill` keeps.

        Evicts least recently used blocks that no reader holds. A key already present is only
        marked recently used: the same name always means the same bytes.
        """
        return self.put_many([key], [payload], spill)[1]

    def put_many(
        self,
        keys: list[bytes],
        payloads: list[torch.Tensor],
        spill: Callable[[bytes], bool] | None = None,
    ) -> tuple[int, list[tuple[bytes, bytes]]]:
        """`put` each block: (how many were stored, evicted blocks that `spill` keeps).

        Slots are taken under the lock, filled outside it in one call (the engine's lookups
        do not wait for the copies), then published: nothing reads a slot before its bytes.
        """
        for payload in payloads:
            if payload.dtype != torch.uint8 or payload.numel() != self.block_nbytes:
                raise ValueError(
                    f"payload must be {self.block_nbytes} uint8 values; got "
                    f"{payload.numel()} {payload.dtype}"
                )
        spilled: list[tuple[bytes, bytes]] = []
        taken: list[tuple[bytes, int, torch.Tensor]] = []
        with self._lock:
            seen = set()
            for key, payload in zip(keys, payloads, strict=True):
                if key in self._index or key in seen:
                    if key in self._index:
                        self._index.move_to_end(key)
                    continue
                if not self._free_slots and not self._evict_one(spill, spilled):
                    if not taken:
                        break  # every slot is being read: drop rather than wait
                    # A batch larger than the tier: its oldest blocks give way, as they would
                    # one put at a time.
                    victim, slot, victim_payload = taken.pop(0)
                    seen.discard(victim)
                    if spill is not None and spill(victim):
                        spilled.append((victim, victim_payload.numpy().tobytes()))
                    self._free_slots.append(slot)
                seen.add(key)
                taken.append((key, self._free_slots.pop(), payload))
        if taken:
            # One call for the batch: each torch call lets the GIL go (see writer.STORE_BATCH).
            torch._foreach_copy_([self._slab[slot] for _, slot, _ in taken],
                                 [p if p.dim() == 1 else p.reshape(-1) for _, _, p in taken])  # fmt: skip
        with self._lock:
            for key, slot, _ in taken:
                self._index[key] = slot
        return len(taken), spilled

    def _evict_one(
        self, spill: Callable[[bytes], bool] | None, spilled: list[tuple[bytes, bytes]]
    ) -> bool:
        """Free the least recently used slot no reader holds (lock held); False if none."""
        victim = next((k for k, s in self._index.items() if s not in self._readers), None)
        if victim is None:
            return False
        slot = self._index.pop(victim)
        if spill is not None and spill(victim):
            spilled.append((victim, self._slab[slot].numpy().tobytes()))
        self._free_slots.append(slot)
        return True

    def acquire(self, key: bytes) -> tuple[int, torch.Tensor] | None:
        """Hold a block for reading: (slot, `[block_nbytes]` uint8 view); None when absent.

        The slot is not reused until `release(slot)`, so asynchronous copies may read it.
        """
        with self._lock:
            slot = self._index.get(key)
            if slot is None:
                return None
            self._index.move_to_end(key)
            self._readers[slot] = self._readers.get(slot, 0) + 1
            return slot, self._slab[slot]

    def hold(self, keys: list[bytes]) -> list[int | None]:
        """`acquire` each key at once, without views: its slot in `slab`, or None if absent."""
        with self._lock:
            slots: list[int | None] = []
            for key in keys:
                slot = self._index.get(key)
                if slot is not None:
                    self._index.move_to_end(key)
                    self._readers[slot] = self._readers.get(slot, 0) + 1
                slots.append(slot)
            return slots

    @property
    def slab(self) -> torch.Tensor:
        """`[num_slots, block_nbytes]` uint8: every slot's payload (read held slots only)."""
        return self._slab

    def release(self, slot: int) -> None:
        """End one `acquire` of `slot`."""
        with self._lock:
            left = self._readers[slot] - 1
            if left:
                self._readers[slot] = left
            else:
                del self._readers[slot]

    def get(self, key: bytes) -> bytes | None:
        """A copy of the block's payload, or None."""
        held = self.acquire(key)
        if held is None:
            return None
        slot, view = held
        try:
            return view.numpy().tobytes()
        finally:
            self.release(slot)

    def discard(self, key: bytes) -> None:
        with self._lock:
            slot = self._index.get(key)
            if slot is not None and slot not in self._readers:
                del self._index[key]
                self._free_slots.append(slot)

    def usage(self) -> TierUsage:
        with self._lock:
            n = len(self._index)
        return TierUsage(n * self.block_nbytes, self.num_slots * self.block_nbytes, n)

    def close(self) -> None:
        with self._lock:
            self._index.clear()
            self._free_slots = list(range(self.num_slots - 1, -1, -1))
