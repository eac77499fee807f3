"""The grammar's token bitmask applied to logits: the CPU paths (the bitmask as an additive
bias, made by the caller or on the engine's mask thread) forbid exactly the tokens a
bit-by-bit reading forbids, for every kind of word and for vocabularies that are not a
multiple of 32 or are shorter or longer than the bitmask, and leave allowed logits unchanged."""

from __future__ import annotations

import pytest
import torch

from soberana.structured.manager import TokenMask, apply_token_bitmask, token_bias


def _bit_by_bit(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    out = logits.clone()
    for b in range(logits.shape[0]):
        for token in range(logits.shape[1]):
            w, j = divmod(token, 32)
            if w >= bitmask.shape[1] or not (int(bitmask[b, w]) >> j) & 1:
                out[b, token] = float("-inf")
    return out


def _random_bitmask(g: torch.Generator, words: int, mostly: str) -> torch.Tensor:
    mixed = torch.randint(-2**31, 2**31 - 1, (3, words), generator=g, dtype=torch.int64)
    mixed = mixed.to(torch.int32)
    pick = torch.rand(3, words, generator=g)
    common = {"zero": 0, "ones": -1, "mixed": None}[mostly]
    return mixed if common is None else torch.where(
        pick < 0.8, torch.full_like(mixed, common), mixed)


@pytest.mark.parametrize("vocab,words", [(256, 8), (100, 4), (100, 3), (70, 3), (64, 2)])
@pytest.mark.parametrize("mostly", ["zero", "ones", "mixed"])
def test_cpu_bitmask_forbids_exactly_the_unset_bits(vocab, words, mostly):
    g = torch.Generator().manual_seed(vocab * 10 + words)
    logits = torch.randn(3, vocab, generator=g)
    bitmask = _random_bitmask(g, words, mostly)
    before = logits.clone()
    expected = _bit_by_bit(logits, bitmask)
    assert torch.equal(apply_token_bitmask(logits, bitmask), expected)
    assert torch.equal(logits, before)  # the caller's logits are left alone
    assert torch.equal(apply_token_bitmask(logits, bitmask, inplace=True), expected)
    assert torch.equal(logits, expected)


@pytest.mark.parametrize("vocab,words", [(256, 8), (100, 4), (100, 3), (70, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_host_bias_equals_the_bitmask_path(vocab, words, dtype):
    """The engine's fast path (bias built on the mask thread, one add in the sampler) gives
    the same logits, bit for bit, as the bitmask read bit by bit, in the sampler's dtypes."""
    g = torch.Generator().manual_seed(vocab + words)
    logits = torch.randn(3, vocab, generator=g).to(dtype)
    bitmask = _random_bitmask(g, words, "mixed")
    expected = _bit_by_bit(logits, bitmask)
    bias = token_bias(bitmask, vocab)
    assert bias.shape == (3, vocab) and bias.dtype == torch.float32
    assert set(bias.unique().tolist()) <= {0.0, float("-inf")}
    out = TokenMask(bitmask, bias).apply_(logits.clone())
    assert out.dtype == dtype and torch.equal(out, expected)
    assert torch.equal(TokenMask(bitmask).apply_(logits.clone()), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_host_bias_of_some_rows_leaves_the_other_rows_alone(dtype):
    """A batch where only rows 1 and 3 are constrained: the bias holds those two rows and is
    added to them in place; rows 0 and 2 keep their logits bit for bit."""
    vocab, words = 100, 4
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(4, vocab, generator=g).to(dtype)
    bitmask = torch.full((4, words), -1, dtype=torch.int32)
    bitmask[[1, 3]] = _random_bitmask(g, words, "mixed")[:2]
    expected = _bit_by_bit(logits, bitmask)
    mask = TokenMask(bitmask, token_bias(bitmask[[1, 3]], vocab), rows=[1, 3])
    out = logits.clone()
    assert mask.apply_(out) is out
    assert out.dtype == dtype and torch.equal(out, expected)
    assert torch.equal(out[[0, 2]], logits[[0, 2]])
