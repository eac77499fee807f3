"""What the warehouse asks of a tier that stores encoded entries (disk, Redis, shared dir)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass
class TierUsage:
    """How full a tier is. `entries` is None where the store cannot count ours cheaply."""

    used_bytes: int
    capacity_bytes: int
    entries: int | None


class EntryStore(Protocol):
    """A byte store keyed by block hash. Stores move bytes; the warehouse checks them.

    Methods may raise OSError or a client library's error; the warehouse turns those into
    misses and never lets them reach the engine. `namespace` is the tenant namespace of the
    entry (`namespace.py`); stores only one replica uses (the local disk) ignore it.
    """

    name: str

    def get(self, key: bytes, namespace: str = "") -> bytes | bytearray | None:
        """The stored entry, or None when absent."""
        ...

    def put(self, key: bytes, entry: bytes, namespace: str = "") -> bool:
        """Publish atomically; False when the key was already there (nothing written)."""
        ...

    def contains_many(self, keys: list[bytes], namespace: str = "") -> list[bool]:
        """Presence of each key, in one round trip where the store allows it."""
        ...

    def discard(self, key: bytes, namespace: str = "") -> None:
        """Remove an entry the warehouse found unsound."""
        ...

    def usage(self) -> TierUsage: ...

    def close(self) -> None: ...
