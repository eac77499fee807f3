"""The grammar's token bitmask applied to logits: the CPU path (whole words where it can)
forbids exactly the tokens a bit-by-bit reading forbids, for every kind of word and for
vocabularies that are not a multiple of 32 or are shorter or longer than the bitmask."""

from __future__ import annotations

import pytest
import torch

from soberana.structured.manager import apply_token_bitmask


def _bit_by_bit(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    out = logits.clone()
    for b in range(logits.shape[0]):
        for token in range(logits.shape[1]):
            w, j = divmod(token, 32)
            if w >= bitmask.shape[1] or not (int(bitmask[b, w]) >> j) & 1:
                out[b, token] = float("-inf")
    return out


@pytest.mark.parametrize("vocab,words", [(256, 8), (100, 4), (100, 3), (70, 3), (64, 2)])
@pytest.mark.parametrize("mostly", ["zero", "ones", "mixed"])
def test_cpu_bitmask_forbids_exactly_the_unset_bits(vocab, words, mostly):
    g = torch.Generator().manual_seed(vocab * 10 + words)
    logits = torch.randn(3, vocab, generator=g)
    mixed = torch.randint(-2**31, 2**31 - 1, (3, words), generator=g, dtype=torch.int64)
    mixed = mixed.to(torch.int32)
    pick = torch.rand(3, words, generator=g)
    common = {"zero": 0, "ones": -1, "mixed": None}[mostly]
    bitmask = mixed if common is None else torch.where(
        pick < 0.8, torch.full_like(mixed, common), mixed)
    before = logits.clone()
    expected = _bit_by_bit(logits, bitmask)
    assert torch.equal(apply_token_bitmask(logits, bitmask), expected)
    assert torch.equal(logits, before)  # the caller's logits are left alone
    assert torch.equal(apply_token_bitmask(logits, bitmask, inplace=True), expected)
    assert torch.equal(logits, expected)
