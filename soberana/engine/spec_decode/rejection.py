"""Verification of drafts against the target's logits: greedy matching or rejection sampling.

For a draft token d at position j drawn from the proposer's q (one-hot for argmax drafts),
accept with probability min(1, p_j(d) / q_j(d)); at the first rejection sample the
correction from max(0, p_j - q_j), normalised; if every draft is accepted sample a bonus
token from p_k. The output then has exactly the target's distribution (Leviathan et al.
2023, Chen et al. 2023). p is the distribution the sampler would sample from: temperature,
top-k, top-p, min-p applied in its order.
"""

from __future__ import annotations

import torch

from soberana.engine.outputs import TokenLogprobs
from soberana.engine.request import Request
from soberana.engine.sampler import (
    Sampler,
    _apply_top_k,
    _apply_top_p,
    _argmax,
    _column,
    apply_penalties,
    gather_logprobs,
    mask_eos_before_min_tokens,
)
from soberana.structured.manager import apply_token_bitmask


def target_probs(logits: torch.Tensor, request: Request) -> torch.Tensor:
    """The sampler's distribution for each row of one sampling request's logits [R, V]."""
    p = request.params
    dev = logits.device
    scaled = logits.float() / p.temperature
    if p.top_k:
        scaled = _apply_top_k(scaled, [p.top_k] * len(scaled))
    if p.top_p < 1.0:
        scaled = _apply_top_p(scaled, _column([p.top_p] * len(scaled), dev))
    if p.min_p:
        probs = scaled.softmax(dim=-1)
        limit = probs.max(dim=-1, keepdim=True).values * p.min_p
        scaled = scaled.masked_fill(probs < limit, float("-inf"))
    return scaled.softmax(dim=-1)


def verify(
    logits: torch.Tensor,
    request: Request,
    drafts: list[int],
    sampler: Sampler,
    token_bitmask: torch.Tensor | None = None,
    draft_probs: torch.Tensor | None = None,
) -> tuple[list[int], list[TokenLogprobs] | None]:
    """The tokens `request` emits from its k + 1 verification rows `logits` [k + 1, V]:
    the accepted drafts and one target token. `token_bitmask` [k + 1, W] holds each row's
    grammar mask (None: unconstrained); `draft_probs` [k, V] is q (None: one-hot)."""
    raw = logits[:, : sampler.vocab_size]
    logits = processed_logits(raw, request, drafts, token_bitmask)
    k = len(drafts)
    if request.params.greedy:
        target = _argmax(logits).tolist()  # the sampler's argmax: the same tie-breaking
        n = 0
        while n < k and drafts[n] == target[n]:
            n += 1
        tokens = target[: n + 1]
    else:
        tokens = _rejection_sample(target_probs(logits, request), drafts, draft_probs,
                                   sampler._generator(request)
                                   if request.params.seed is not None else None)
    logprobs = None
    if request.params.logprobs is not None:  # raw logprobs, as the sampler reports them
        rows = torch.log_softmax(raw[: len(tokens)].float(), dim=-1)
        chosen = torch.tensor(tokens, dtype=torch.long, device=raw.device)
        logprobs = gather_logprobs(rows, chosen, [request.params.logprobs] * len(tokens))
    return tokens, logprobs


def processed_logits(logits: torch.Tensor, request: Request, drafts: list[int],
                     token_bitmask: torch.Tensor | None) -> torch.Tensor:
    """What the sampler would choose from at each verification row, in its order:
    penalties, the min_tokens EOS mask, the grammar mask. Row j sees the output so far plus
    drafts[:j], exactly what the plain engine would have produced by then."""
    p = request.params
    out = request.output_token_ids
    rows = len(drafts) + 1
    if p.has_penalties:  # in float32, as the sampler does: the same values bit for bit
        logits = apply_penalties(logits.float(), [out + drafts[:j] for j in range(rows)],
                                 [request.prompt_token_ids] * rows, [p] * rows)
    logits = mask_eos_before_min_tokens(logits, [len(out) + j for j in range(rows)],
                                        [p] * rows)
    if token_bitmask is not None:
        logits = apply_token_bitmask(logits, token_bitmask)
    return logits


def _rejection_sample(probs: torch.Tensor, drafts: list[int], q: torch.Tensor | None,
                      gen: torch.Generator | None) -> list[int]:
    k = len(drafts)
    uniform = torch.rand(k, generator=gen, device=probs.device).tolist() if k else []
    out: list[int] = []
    for j, d in enumerate(drafts):
        p_d = float(probs[j, d])
        q_d = 1.0 if q is None else float(q[j, d])
        if q_d > 0 and uniform[j] < p_d / q_d:  # accept with probability min(1, p/q)
            out.append(d)
            continue
        if q is None:
            residual = probs[j].clone()
            residual[d] = 0.0
        else:
            residual = (probs[j] - q[j]).clamp_(min=0.0)
        if float(residual.sum()) <= 0:  # p == q: cannot happen after a rejection; be safe
            residual = probs[j]
        out.append(int(torch.multinomial(residual, 1, generator=gen)))
        return out
    out.append(int(torch.multinomial(probs[k], 1, generator=gen)))
    return out
