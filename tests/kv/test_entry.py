"""The stored entry format: anything but a sound entry of this block in this layout is a miss."""

from __future__ import annotations

import os
import struct

import pytest
import torch
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from soberana.kv.entry import (
    FORMAT_VERSION,
    HEADER_SIZE,
    decode_entry,
    encode_entry,
    entry_problem,
    entry_size,
)
from soberana.kv.layout import KVLayout
from tests.kv.helpers import make_hashes, small_layout

LAYOUT = small_layout()
KEY = make_hashes(LAYOUT, 1)[0]
PAYLOAD = os.urandom(LAYOUT.block_nbytes)
ENTRY = encode_entry(LAYOUT, KEY, PAYLOAD)


def test_round_trip_returns_the_exact_payload():
    assert len(ENTRY) == entry_size(LAYOUT) == HEADER_SIZE + LAYOUT.block_nbytes
    assert bytes(decode_entry(LAYOUT, KEY, ENTRY)) == PAYLOAD
    assert entry_problem(LAYOUT, KEY, ENTRY) is None


@settings(max_examples=300, deadline=None)
@given(position=st.integers(0, len(ENTRY) - 1), flip=st.integers(1, 255))
def test_any_corrupted_byte_is_refused(position, flip):
    damaged = bytearray(ENTRY)
    damaged[position] ^= flip
    assert decode_entry(LAYOUT, KEY, damaged) is None


@settings(max_examples=100, deadline=None)
@given(length=st.integers(0, len(ENTRY) - 1))
def test_a_truncated_entry_is_refused(length):
    assert decode_entry(LAYOUT, KEY, ENTRY[:length]) is None


def test_trailing_bytes_are_refused():
    assert decode_entry(LAYOUT, KEY, ENTRY + b"\0") is None


@pytest.mark.parametrize(
    "other",
    [
        small_layout(model="another-model"),
        small_layout(dtype="float16", head_dim=16),  # same byte size, other meaning
        small_layout(block_size=8, num_layers=1),  # same byte size, other shape
        small_layout(num_kv_heads=4, head_dim=4),
        small_layout(kv_layout="kv,layer,block,slot,kv_head,head_dim"),
    ],
    ids=["model", "dtype", "block-size", "heads", "axis-order"],
)
def test_an_entry_written_for_another_model_or_layout_is_refused(other: KVLayout):
    assert other.block_nbytes == LAYOUT.block_nbytes
    foreign = encode_entry(other, KEY, PAYLOAD)
    assert decode_entry(LAYOUT, KEY, foreign) is None
    assert "another model" in entry_problem(LAYOUT, KEY, foreign)


def test_an_entry_stored_under_another_blocks_name_is_refused():
    other_key = make_hashes(LAYOUT, 2)[1]
    assert decode_entry(LAYOUT, other_key, ENTRY) is None


def test_an_entry_of_another_format_version_is_refused_even_with_a_valid_checksum():
    fields = bytearray(ENTRY[: HEADER_SIZE - 16])
    struct.pack_into("<H", fields, 4, FORMAT_VERSION + 1)
    checksum = xxhash.xxh3_128(bytes(fields) + PAYLOAD).digest()
    newer = bytes(fields) + checksum + PAYLOAD
    assert "format version" in entry_problem(LAYOUT, KEY, newer)


def test_encoding_refuses_a_payload_of_the_wrong_size():
    with pytest.raises(ValueError, match="payload must be 1024 bytes"):
        encode_entry(LAYOUT, KEY, PAYLOAD[:-1])


def test_layout_is_read_from_the_engines_cache_tensor():
    cache = torch.zeros(3, 2, 10, 16, 4, 64, dtype=torch.bfloat16)
    layout = KVLayout.from_kv_cache(cache, "fp")
    assert layout.block_shape == tuple(cache[:, :, 0].shape)
    assert layout.block_nbytes == cache[:, :, 0].numel() * 2
    assert layout.dtype == "bfloat16"
    with pytest.raises(ValueError, match="kv_cache must be"):
        KVLayout.from_kv_cache(torch.zeros(3, 10, 16, 4, 64), "fp")
