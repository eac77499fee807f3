"""How a tier's entries are encoded: checked (private tiers) or sealed with a shared key
(Redis and the shared directory, which other machines can write).

A checked entry (`entry.py`) catches torn, truncated and flipped bytes, but anyone who can
write the store can compute its unkeyed checksum over another block's payload. A sealed
entry carries a tag keyed by a secret the replicas of one trust domain share, over the
layout fingerprint, the block hash, the tenant namespace and the payload: an entry cannot
be forged without the key, nor replayed under another block's name or another tenant's
namespace. With `encrypt`, the payload is AES-256-GCM ciphertext, so the store holds no
readable KV (which is close to plaintext prompt content).

Sealed layout (little-endian):

    magic        4s   b"SBKS"
    version      u16  SEALED_VERSION
    header_size  u16  SEALED_HEADER_SIZE
    mode         u8   1: HMAC-SHA256 over header fields and payload; 2: AES-256-GCM
    (padding)    3x
    layout       32s  KVLayout.fingerprint
    block_hash   32s  the name the entry was written under
    payload_len  u64  KVLayout.block_nbytes
    nonce        12s  AES-GCM nonce (random per entry); zero for mode 1
    tag          32s  HMAC-SHA256 (mode 1), or the 16-byte GCM tag then 16 zero bytes
    payload           the block's bytes (mode 1) or their ciphertext (mode 2)

The tag's associated data is every field above the nonce plus the tenant namespace (not
stored: the reader knows which namespace it asked for).
"""

from __future__ import annotations

import hmac
import os
import struct
from typing import Protocol

from soberana.kv.entry import HEADER_SIZE, encode_entry, entry_problem, entry_size
from soberana.kv.layout import KVLayout

Buffer = bytes | bytearray | memoryview

SEALED_MAGIC = b"SBKS"
SEALED_VERSION = 1
MODE_MAC = 1
MODE_AES_GCM = 2
_FIELDS = struct.Struct("<4sHHB3x32s32sQ")
_NONCE_BYTES = 12
_TAG_BYTES = 32
_GCM_TAG_BYTES = 16
SEALED_HEADER_SIZE = _FIELDS.size + _NONCE_BYTES + _TAG_BYTES
# A secret shorter than this is guessable offline from one stored entry.
MIN_SECRET_BYTES = 16


class EntryRejected(Exception):
    """An entry that must not be loaded; the message says why."""


class EntryCodec(Protocol):
    """Turns a block's payload into a stored entry and back, refusing anything unsound."""

    entry_size: int

    def encode(self, block_hash: bytes, payload: Buffer, namespace: str = "") -> bytes: ...

    def decode(self, block_hash: bytes, entry: Buffer, namespace: str = "") -> Buffer:
        """The payload, or EntryRejected."""
        ...


class CheckedCodec:
    """`entry.py`'s format: XXH3-checked, for tiers nobody else writes (the local disk) and
    for shared tiers an operator marked trusted (`--kv-shared-trusted`)."""

    def __init__(self, layout: KVLayout) -> None:
        self.layout = layout
        self.entry_size = entry_size(layout)

    def encode(self, block_hash: bytes, payload: Buffer, namespace: str = "") -> bytes:
        return encode_entry(self.layout, block_hash, payload)

    def decode(self, block_hash: bytes, entry: Buffer, namespace: str = "") -> Buffer:
        problem = entry_problem(self.layout, block_hash, entry)
        if problem is not None:
            raise EntryRejected(problem)
        return memoryview(entry)[HEADER_SIZE:]


def derive_key(secret: bytes, purpose: str) -> bytes:
    """A 32-byte key for one purpose, so that no two uses share key material."""
    return hmac.digest(secret, f"soberana-kv-{purpose}-v1".encode(), "sha256")


class SealedCodec:
    """Entries authenticated (and with `encrypt`, encrypted) with a shared secret."""

    def __init__(self, layout: KVLayout, secret: bytes, encrypt: bool = False) -> None:
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(
                f"the KV shared key must be at least {MIN_SECRET_BYTES} bytes; got {len(secret)}"
            )
        self.layout = layout
        self.mode = MODE_AES_GCM if encrypt else MODE_MAC
        self.entry_size = SEALED_HEADER_SIZE + layout.block_nbytes
        self._mac_key = derive_key(secret, "entry-mac")
        self._encrypt = encrypt
        self._enc_key = derive_key(secret, "entry-aes-gcm")

    def _cipher(self, aad: bytes):
        """AES-256-GCM under a key of this block's own (name, layout, namespace).

        Random 96-bit nonces under one key are safe for about 2^32 messages; a fleet writing
        10,000 blocks a second reaches that in five days. Each block name gets its own key
        instead, and is written a handful of times in its life.
        """
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        return AESGCM(hmac.digest(self._enc_key, aad, "sha256"))

    def _fields(self, block_hash: bytes) -> bytes:
        return _FIELDS.pack(
            SEALED_MAGIC, SEALED_VERSION, SEALED_HEADER_SIZE, self.mode,
            self.layout.fingerprint, block_hash, self.layout.block_nbytes,
        )  # fmt: skip

    def encode(self, block_hash: bytes, payload: Buffer, namespace: str = "") -> bytes:
        if len(block_hash) != 32:
            raise ValueError(f"block_hash must be 32 bytes; got {len(block_hash)}")
        if len(payload) != self.layout.block_nbytes:
            raise ValueError(
                f"payload must be {self.layout.block_nbytes} bytes; got {len(payload)}"
            )
        fields = self._fields(block_hash)
        aad = fields + namespace.encode()
        if not self._encrypt:
            mac = hmac.new(self._mac_key, aad, "sha256")
            mac.update(payload)
            return b"".join((fields, bytes(_NONCE_BYTES), mac.digest(), payload))
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._cipher(aad).encrypt(nonce, bytes(payload), aad)
        ciphertext, tag = memoryview(sealed)[:-_GCM_TAG_BYTES], sealed[-_GCM_TAG_BYTES:]
        padded_tag = tag + bytes(_TAG_BYTES - _GCM_TAG_BYTES)
        return b"".join((fields, nonce, padded_tag, ciphertext))

    def decode(self, block_hash: bytes, entry: Buffer, namespace: str = "") -> Buffer:
        view = memoryview(entry)
        if view.nbytes != self.entry_size:
            raise EntryRejected(f"length {view.nbytes} bytes, expected {self.entry_size}")
        fields = bytes(view[: _FIELDS.size])
        expected = self._fields(block_hash)
        if fields != expected:
            # Which field differs says whether this is damage, another model or a forgery.
            magic, version, _, mode, fingerprint, stored_hash, _ = _FIELDS.unpack(fields)
            if magic != SEALED_MAGIC or version != SEALED_VERSION:
                raise EntryRejected("not a sealed entry (unkeyed or foreign format)")
            if mode != self.mode:
                raise EntryRejected(f"sealed in mode {mode}, this replica uses {self.mode}")
            if fingerprint != self.layout.fingerprint:
                raise EntryRejected("written for another model or KV layout")
            if stored_hash != block_hash:
                raise EntryRejected("stored under another block's name")
            raise EntryRejected("header mismatch")
        nonce = bytes(view[_FIELDS.size : _FIELDS.size + _NONCE_BYTES])
        tag = bytes(view[_FIELDS.size + _NONCE_BYTES : SEALED_HEADER_SIZE])
        body = view[SEALED_HEADER_SIZE:]
        aad = fields + namespace.encode()
        # Bytes the mode leaves unused must be zero: every stored byte is then checked.
        unused = nonce if not self._encrypt else tag[_GCM_TAG_BYTES:]
        if any(unused):
            raise EntryRejected("unused header bytes are set")
        if not self._encrypt:
            mac = hmac.new(self._mac_key, aad, "sha256")
            mac.update(body)
            if not hmac.compare_digest(mac.digest(), tag):
                raise EntryRejected("authentication failed (wrong key, forged or damaged)")
            return body
        from cryptography.exceptions import InvalidTag

        try:
            return self._cipher(aad).decrypt(nonce, bytes(body) + tag[:_GCM_TAG_BYTES], aad)
        except InvalidTag:
            raise EntryRejected("authentication failed (wrong key, forged or damaged)") from None
