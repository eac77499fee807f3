"""Content addressing of full KV blocks: a SHA-256 chain, the same on every machine.

The chain's root (the seed) is the KV layout's fingerprint (`soberana.kv.layout.KVLayout`):
model, cache dtype, block size, shape and axis order, named once for the GPU pool and every
warehouse tier alike.
"""

from __future__ import annotations

import hashlib
from array import array

HASH_BYTES = 32


def block_hash(parent: bytes, token_ids: list[int], cache_salt: str | None = None) -> bytes:
    """Hash of one full block: its parent's hash (or the seed, `KVLayout.fingerprint`), the
    salt, and its token ids."""
    h = hashlib.sha256(parent)
    if cache_salt:
        # The salt is length-prefixed so that no salt can collide with a token prefix.
        salt = cache_salt.encode()
        h.update(len(salt).to_bytes(4, "little") + salt)
    else:
        h.update(b"\0\0\0\0")
    h.update(array("q", token_ids).tobytes())  # int64, little-endian on every supported host
    return h.digest()


def chain_hashes(
    seed: bytes, token_ids: list[int], block_size: int, cache_salt: str | None,
    known: list[bytes] | None = None,
) -> list[bytes]:
    """Hashes of every full block of `token_ids`, extending the already `known` prefix."""
    hashes = list(known or [])
    parent = hashes[-1] if hashes else seed
    for start in range(len(hashes) * block_size, len(token_ids) - block_size + 1, block_size):
        parent = block_hash(parent, token_ids[start:start + block_size], cache_salt)
        hashes.append(parent)
    return hashes
