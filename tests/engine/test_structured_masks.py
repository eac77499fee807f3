"""The engine's batch masks from real llguidance matchers: the CPU fast path (the additive bias
built in the engine loop) forbids exactly what llguidance's bitmask forbids, step after step
of a real generation, and leaves unconstrained rows of the batch alone; the CPU's sampled-token
check refuses every token the mask forbids."""

from __future__ import annotations

import random

import pytest
import torch

from soberana.engine.request import Request
from soberana.engine.sampler import Sampler
from soberana.engine.sampling_params import SamplingParams
from soberana.structured.manager import StructuredOutputManager
from soberana.structured.params import StructuredOutputsParams

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12},
    "tags": {"type": "array", "items": {"enum": ["a", "bc", "def"]}, "maxItems": 3},
    "n": {"type": "integer"}}, "required": ["name", "tags", "n"], "additionalProperties": False}


def _request(rid: str, spec: StructuredOutputsParams | None) -> Request:
    params = SamplingParams(max_tokens=64, structured_outputs=spec)
    return Request(rid, 0, [5, 6, 7], params, 0.0, 0, None, 64)


def _unpacked(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """Allowed tokens, bit by bit (bit j of word w: token 32w + j)."""
    shifts = torch.arange(32, dtype=torch.int32)
    return ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)[:, :vocab]


def test_host_bias_forbids_what_the_bitmask_forbids_at_every_step(tiny_models):
    vocab = 934
    path = tiny_models["llama31"]
    fast = StructuredOutputManager(path, vocab, [1], device="cpu")
    full = StructuredOutputManager(path, vocab, [1], device="cuda")  # bitmask only, no bias
    spec = StructuredOutputsParams(json=SCHEMA)
    batch = [_request("free", None), _request("json", spec), _request("json2", spec)]
    for manager in (fast, full):
        for r in batch:
            manager.add(r)
    rng = random.Random(0)
    logits = torch.randn(len(batch), vocab, generator=torch.Generator().manual_seed(0))
    for _ in range(40):
        lazy, b = fast.start_masks(batch).result(), full.start_masks(batch).result()
        a = lazy.mask()
        assert a.bias is not None and b.bias is None
        assert torch.equal(a.bitmask, b.bitmask)
        allowed = _unpacked(a.bitmask, vocab)
        assert allowed[0].all()  # the free row allows everything
        masked = a.apply_(logits.clone())
        assert torch.equal(masked, b.apply_(logits.clone()))
        assert torch.equal(masked, logits.masked_fill(~allowed, float("-inf")))
        # The sampled-token check lets no forbidden token through, and sends an allowed one
        # to the mask only where bytes are forced (the mask is then the canonical token) or
        # the grammar has ended (the mask is EOS).
        forced = {row: bool(m.compute_ff_bytes()) or m.is_stopped()
                  for row, m in lazy.matchers.items()}
        for token in range(vocab):
            refused = lazy.refused([token] * len(batch))
            for row in (1, 2):
                assert row in refused if not allowed[row, token] else (
                    row not in refused or forced[row])
        if not allowed[1].any():
            break
        for row in (1, 2):  # feed each constrained row an allowed token
            token = rng.choice(allowed[row].nonzero().flatten().tolist())
            batch[row].output_token_ids.append(token)
            fast.accept(batch[row], token)
            full.accept(batch[row], token)
    assert len(batch[1].output_token_ids) > 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_rows_chosen_again_get_the_masked_argmax(tiny_models, dtype):
    """Plain greedy rows keep the model's dtype: the second choice of a refused row (numpy
    for float32, torch for bfloat16) is the argmax of the logits its mask allows, as masking
    first picks, step after step."""
    vocab = 934
    manager = StructuredOutputManager(tiny_models["llama31"], vocab, [1], device="cpu")
    spec = StructuredOutputsParams(json=SCHEMA)
    batch = [_request("json", spec), _request("free", None), _request("json2", spec)]
    for r in batch:
        r.params = SamplingParams(temperature=0.0, max_tokens=64,
                                  structured_outputs=r.params.structured_outputs)
        manager.add(r)
    sampler = Sampler(vocab, torch.device("cpu"))
    gen = torch.Generator().manual_seed(1)
    chosen_again = 0
    for _ in range(30):
        logits = torch.randn(len(batch), vocab, generator=gen).to(dtype)
        lazy = manager.start_masks(batch).result()
        expected = lazy.mask().apply_(logits.float().clone()).argmax(dim=-1)
        sampled = logits.float().argmax(dim=-1)
        tokens = sampler(logits.clone(), batch, lazy).token_ids
        assert torch.equal(tokens, expected)
        chosen_again += int((tokens != sampled).sum())
        for row in (0, 2):
            token = int(tokens[row])
            batch[row].output_token_ids.append(token)
            manager.accept(batch[row], token)
    assert chosen_again > 10
