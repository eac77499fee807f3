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
    gather_logprobs,
)


def eligible(request: Request) -> bool:
    """Whether verifying drafts for `request` reproduces the sampler exactly: nothing that
    depends on the output so far changes its logits (penalties, a min_tokens EOS mask, a
    structured-output grammar mask). Other requests decode one token at a time."""
    p = request.params
    return (not p.has_penalties and len(request.output_token_ids) >= p.min_tokens
            and getattr(p, "structured_outputs", None) is None
            and getattr(p, "guided_decoding", None) is None)


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
    draft_probs: torch.Tensor | None = None,
) -> tuple[list[int], list[TokenLogprobs] | None]:
    """The tokens `request` emits from its k + 1 verification rows `logits` [k + 1, V]:
    the accepted drafts and one target token. `draft_probs` [k, V] is q (None: one-hot)."""
    logits = logits[:, : sampler.vocab_size]
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
        rows = torch.log_softmax(logits[: len(tokens)].float(), dim=-1)
        chosen = torch.tensor(tokens, dtype=torch.long, device=logits.device)
        logprobs = gather_logprobs(rows, chosen, [request.params.logprobs] * len(tokens))
    return tokens, logprobs


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
