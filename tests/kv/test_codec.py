"""Sealed entries: any changed byte, another name, namespace, layout or key is refused."""

from __future__ import annotations

import pytest

from soberana.kv.codec import SEALED_HEADER_SIZE, CheckedCodec, EntryRejected, SealedCodec
from tests.kv.helpers import block_bytes, make_cache, make_hashes, small_layout

LAYOUT = small_layout()
KEY = b"the replicas' shared secret, 32+"


@pytest.mark.parametrize("encrypt", [False, True], ids=["mac", "aes-gcm"])
def test_every_changed_byte_of_a_sealed_entry_is_refused(encrypt):
    codec = SealedCodec(LAYOUT, KEY, encrypt)
    h = make_hashes(LAYOUT, 1)[0]
    payload = block_bytes(make_cache(LAYOUT, 1), 0)
    entry = codec.encode(h, payload, "ns")
    assert len(entry) == codec.entry_size == SEALED_HEADER_SIZE + LAYOUT.block_nbytes
    assert bytes(codec.decode(h, entry, "ns")) == payload
    for i in range(len(entry)):
        damaged = bytearray(entry)
        damaged[i] ^= 0x01
        with pytest.raises(EntryRejected):
            codec.decode(h, damaged, "ns")
    for truncated in (entry[:-1], entry[:SEALED_HEADER_SIZE], b""):
        with pytest.raises(EntryRejected, match="length"):
            codec.decode(h, truncated, "ns")


@pytest.mark.parametrize("encrypt", [False, True], ids=["mac", "aes-gcm"])
def test_a_sealed_entry_only_opens_under_its_name_namespace_layout_and_key(encrypt):
    codec = SealedCodec(LAYOUT, KEY, encrypt)
    a, b = make_hashes(LAYOUT, 2)
    entry = codec.encode(a, bytes(LAYOUT.block_nbytes), "ns")
    with pytest.raises(EntryRejected, match="another block's name"):
        codec.decode(b, entry, "ns")
    with pytest.raises(EntryRejected, match="authentication failed"):
        codec.decode(a, entry, "other-ns")
    with pytest.raises(EntryRejected, match="authentication failed"):
        SealedCodec(LAYOUT, b"another domain's key", encrypt).decode(a, entry, "ns")
    with pytest.raises(EntryRejected, match="another model"):
        SealedCodec(small_layout(model="m2"), KEY, encrypt).decode(a, entry, "ns")
    with pytest.raises(EntryRejected, match="mode"):
        SealedCodec(LAYOUT, KEY, not encrypt).decode(a, entry, "ns")
    with pytest.raises(EntryRejected, match="not a sealed entry"):
        codec.decode(a, CheckedCodec(LAYOUT).encode(a, bytes(LAYOUT.block_nbytes)) + bytes(32), "ns")


def test_encryption_draws_a_fresh_nonce_per_entry():
    codec = SealedCodec(LAYOUT, KEY, encrypt=True)
    h = make_hashes(LAYOUT, 1)[0]
    payload = block_bytes(make_cache(LAYOUT, 1), 0)
    first, second = codec.encode(h, payload), codec.encode(h, payload)
    assert first != second
    assert bytes(codec.decode(h, first)) == bytes(codec.decode(h, second)) == payload


def test_a_short_key_is_refused():
    with pytest.raises(ValueError, match="at least 16 bytes; got 5"):
        SealedCodec(LAYOUT, b"short")
