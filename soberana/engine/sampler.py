"""Sampling of one token per row, vectorised over the batch; no loop over the vocabulary.

Order (as vLLM): raw logprobs for the user are taken first; then penalties, the min_tokens
EOS mask, the grammar mask, greedy argmax or temperature → top-k → top-p → min-p →
Gumbel-max sampling. Seeded rows draw their noise from their own generator, so their samples
do not depend on what else is in the batch.

On a CPU the grammar mask can come last instead (LazyTokenMask): every row is sampled from
its unmasked logits, and only the rows whose token a grammar refuses get their mask and are
chosen again with the same noise. Where the batch has no top-k, top-p or min-p, this picks
exactly the token masking first would: a row's choice is the argmax of scores (its logits,
or its scaled logits plus Gumbel noise) in which the mask only turns forbidden entries to
-inf, so an allowed argmax of the unmasked scores is the masked argmax too. Truncation is
not exact this way (the kept set depends on the mask), so such batches mask first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from soberana.engine.outputs import TokenLogprobs
from soberana.engine.request import Request
from soberana.engine.sampling_params import SamplingParams
from soberana.structured.manager import LazyTokenMask, TokenMask

_NEG_INF = float("-inf")


@dataclass
class SamplerOutput:
    """Sampled ids and asked-for logprobs, still on the device: reading them on the host is
    the step's one synchronisation, left to the caller (async scheduling defers it)."""

    token_ids: torch.Tensor  # [N] int64
    logprobs: DeviceLogprobs | None


class Sampler:
    def __init__(self, vocab_size: int, device: torch.device,
                 argmax: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:  # fmt: skip
        self.vocab_size = vocab_size
        self.device = device
        # greedy rows: the compute backend's argmax (the native CPU kernel is ~10x faster
        # than torch's at 64 x 32k)
        self.argmax = argmax or (lambda logits: logits.argmax(dim=-1))
        self.generators: dict[tuple[str, int], torch.Generator] = {}

    def forget(self, request: Request) -> None:
        self.generators.pop(request.key, None)

    def __call__(
        self,
        logits: torch.Tensor,
        requests: list[Request],
        token_mask: TokenMask | LazyTokenMask | None = None,
    ) -> SamplerOutput:
        """Sample one token for each row of `logits` [N, V], row i for requests[i].

        Logits in the model's dtype are fine: anything but a plain greedy choice (logprobs,
        penalties, min_tokens, sampling) works on their float32 values; a plain argmax needs
        no conversion (a bfloat16/float16 value is exact in float32, so it picks the same
        token). Nothing here waits for the device: per-request values go up with non-blocking
        copies. `token_mask` (structured outputs) forbids tokens after the user's raw
        logprobs are taken, as vLLM does, so the logprobs are the unmasked distribution's.
        """
        logits = logits[:, : self.vocab_size]
        want_lp = [r.params.logprobs for r in requests]
        if any(not _plain_greedy(r) for r in requests) or any(n is not None for n in want_lp):
            logits = logits.float()
        raw_logprobs = (
            torch.log_softmax(logits, dim=-1) if any(n is not None for n in want_lp) else None
        )
        logits = self._penalize(logits, requests)
        logits = self._mask_eos_before_min_tokens(logits, requests)
        lazy = self._samples_first(token_mask, requests)
        if token_mask is not None and not lazy:  # the step's own logits, read by nothing after
            logits = token_mask.apply_(logits)
        tokens, scores = self._choose(logits, requests)
        if lazy:
            tokens = self._choose_again_where_refused(tokens, scores, token_mask)
        logprobs = None
        if raw_logprobs is not None:
            logprobs = DeviceLogprobs.gather(raw_logprobs, tokens, want_lp)
        return SamplerOutput(token_ids=tokens, logprobs=logprobs)

    def _penalize(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        rows = [i for i, r in enumerate(requests) if r.params.has_penalties]
        if not rows:
            return logits
        logits = logits.clone()
        sub = apply_penalties(logits[rows], [requests[i].output_token_ids for i in rows],
                              [requests[i].prompt_token_ids for i in rows],
                              [requests[i].params for i in rows])
        logits[_to(rows, torch.long, logits.device)] = sub
        return logits

    def _mask_eos_before_min_tokens(
        self, logits: torch.Tensor, requests: list[Request]
    ) -> torch.Tensor:
        return mask_eos_before_min_tokens(logits, [len(r.output_token_ids) for r in requests],
                                          [r.params for r in requests])

    def _samples_first(self, token_mask: TokenMask | LazyTokenMask | None,
                       requests: list[Request]) -> bool:
        """Whether to sample before the grammar mask (exact where nothing truncates)."""
        return isinstance(token_mask, LazyTokenMask) and not any(
            r.params.top_k or r.params.top_p < 1.0 or r.params.min_p for r in requests)

    def _choose(self, logits: torch.Tensor, requests: list[Request]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's token, and the scores [N, V] it is the argmax of: greedy rows' logits,
        sampled rows' scaled (and truncated) logits plus Gumbel noise."""
        greedy = [r.params.greedy for r in requests]
        if all(greedy):
            return self.argmax(logits), logits
        dev = logits.device
        temps = _column([1.0 if g else r.params.temperature for g, r in zip(greedy, requests)], dev)
        scaled = logits / temps
        top_k = [r.params.top_k for r in requests]
        if any(top_k):
            scaled = _apply_top_k(scaled, top_k)
        top_p = [r.params.top_p for r in requests]
        if any(p < 1.0 for p in top_p):
            scaled = _apply_top_p(scaled, _column(top_p, dev))
        min_p = [r.params.min_p for r in requests]
        if any(min_p):
            probs = scaled.softmax(dim=-1)
            limit = probs.max(dim=-1, keepdim=True).values * _column(min_p, dev)
            scaled = scaled.masked_fill(probs < limit, _NEG_INF)
        noise = torch.empty_like(scaled).exponential_()
        for i, r in enumerate(requests):
            if r.params.seed is not None and not greedy[i]:
                noise[i].exponential_(generator=self._generator(r))
        # Gumbel-max (the exponential race in log space): argmax s_i - log E_i samples i with
        # probability softmax(s)_i. Unlike p_i / E_i it needs no normalisation, so a mask
        # added later leaves the allowed entries' scores bit for bit as they were.
        scores = scaled.sub_(noise.log_())  # `scaled` is this function's own tensor
        if any(greedy):
            scores = torch.where(_to(greedy, torch.bool, dev).unsqueeze(1), logits, scores)
        return self.argmax(scores), scores

    def _choose_again_where_refused(self, tokens: torch.Tensor, scores: torch.Tensor,
                                    token_mask: LazyTokenMask) -> torch.Tensor:
        """`tokens` with each row whose token its grammar refuses chosen again from its
        masked scores (the same noise: the token masking first would have chosen)."""
        refused = token_mask.refused(tokens.tolist())
        if not refused:
            return tokens
        forbidden = ~token_mask.allowed(refused, scores.shape[1])
        if scores.dtype == torch.float32:
            # numpy on one thread: each small torch op opens an OpenMP region, which costs
            # milliseconds on a loaded 2-core host. Forbidden scores become score + -inf, as
            # masking first makes them (a NaN stays NaN); np.argmax, as the sampler's: the
            # first of equal maxima wins, and a NaN wins.
            rows = scores.numpy()[refused]
            np.add(rows, _NEG_INF, out=rows, where=forbidden)
            tokens.numpy()[refused] = rows.argmax(axis=1)
        else:  # greedy rows in the model's dtype
            index = _to(refused, torch.long, scores.device)
            bias = torch.from_numpy(np.where(forbidden, np.float32(_NEG_INF), np.float32(0)))
            tokens[index] = self.argmax(scores[index] + bias.to(scores.dtype))
        return tokens

    def _generator(self, request: Request) -> torch.Generator:
        gen = self.generators.get(request.key)
        if gen is None:
            seed = (request.params.seed + request.index) % 2**63
            gen = torch.Generator(device=self.device).manual_seed(seed)
            self.generators[request.key] = gen
        return gen


def apply_penalties(logits: torch.Tensor, outputs: list[list[int]], prompts: list[list[int]],
                    params: list[SamplingParams]) -> torch.Tensor:
    """Repetition, frequency and presence penalties on every row of float `logits` [N, V]:
    row i has produced `outputs[i]` after `prompts[i]` (speculative verification passes one
    row per drafted position, its output including the drafts before it)."""
    n, v = logits.shape
    dev = logits.device
    counts = torch.zeros(n, v, device=dev)
    in_prompt = torch.zeros(n, v, dtype=torch.bool, device=dev)
    for j, (out, prompt) in enumerate(zip(outputs, prompts)):  # vectorised inside a row
        if out:
            counts[j].index_add_(0, _to(out, torch.long, dev), torch.ones(len(out), device=dev))
        in_prompt[j, _to(prompt, torch.long, dev)] = True
    rep = _column([p.repetition_penalty for p in params], dev)
    seen = in_prompt | (counts > 0)
    # Repetition penalty (CTRL / transformers): divide positive logits, multiply negative.
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalized, logits)
    freq = _column([p.frequency_penalty for p in params], dev)
    pres = _column([p.presence_penalty for p in params], dev)
    # OpenAI: frequency scales with each output occurrence, presence applies once.
    return logits - freq * counts - pres * (counts > 0).float()


def mask_eos_before_min_tokens(logits: torch.Tensor, num_outputs: list[int],
                               params: list[SamplingParams]) -> torch.Tensor:
    """`logits` with the stop and EOS ids of rows that have produced fewer than min_tokens
    (`num_outputs[i]` so far) set to -inf."""
    rows: list[int] = []
    cols: list[int] = []
    for i, (num, p) in enumerate(zip(num_outputs, params)):
        if num < p.min_tokens:
            stops = list(p.stop_token_ids)
            if not p.ignore_eos:
                stops += p.eos_token_ids
            stops = [t for t in stops if t < logits.shape[1]]
            rows += [i] * len(stops)
            cols += stops
    if not rows:
        return logits
    logits = logits.clone()
    dev = logits.device
    logits[_to(rows, torch.long, dev), _to(cols, torch.long, dev)] = _NEG_INF
    return logits


def _plain_greedy(request: Request) -> bool:
    """Greedy with nothing that changes the logits first (penalties, a min_tokens mask)."""
    p = request.params
    return p.greedy and not p.has_penalties and len(request.output_token_ids) >= p.min_tokens


def _to(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list on the device without waiting for the device's queue (a blocking
    copy would synchronise the stream and stall async scheduling)."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    return _to(values, torch.float32, device).unsqueeze(1)


def _apply_top_k(logits: torch.Tensor, top_k: list[int]) -> torch.Tensor:
    v = logits.shape[1]
    k_list = [min(t, v) if t > 0 else v for t in top_k]
    k = _to(k_list, torch.long, logits.device)
    top = logits.topk(max(k_list), dim=-1).values
    threshold = top.gather(1, (k - 1).unsqueeze(1))
    return logits.masked_fill(logits < threshold, _NEG_INF)


def _apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    # Drop the low tail whose mass is <= 1 - top_p; the most likely token always stays.
    drop = cum <= 1 - top_p
    drop[:, -1] = False
    sorted_logits = sorted_logits.masked_fill(drop, _NEG_INF)
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


@dataclass
class DeviceLogprobs:
    """The chosen token's logprob and rank plus the top-N for rows that asked (N >= 0),
    computed on the device; `host_tensors` are copied back and `build` makes the records."""

    num_rows: int
    rows: list[int]
    num_top: list[int]
    chosen: torch.Tensor
    chosen_lp: torch.Tensor
    ranks: torch.Tensor
    top_lp: torch.Tensor
    top_ids: torch.Tensor

    @classmethod
    def gather(
        cls, logprobs: torch.Tensor, chosen: torch.Tensor, num_top: list[int | None]
    ) -> DeviceLogprobs:
        rows = [i for i, n in enumerate(num_top) if n is not None]
        lp = logprobs[_to(rows, torch.long, logprobs.device)]
        ch = chosen[_to(rows, torch.long, chosen.device)].unsqueeze(1)
        chosen_lp = lp.gather(1, ch)
        ranks = (lp > chosen_lp).sum(dim=1) + 1
        kmax = max((num_top[i] for i in rows), default=0)
        top_lp, top_ids = lp.topk(kmax, dim=-1) if kmax > 0 else (lp[:, :0], ch[:, :0])
        return cls(len(num_top), rows, [num_top[i] for i in rows], ch.squeeze(1),
                   chosen_lp.squeeze(1), ranks, top_lp, top_ids)

    def host_tensors(self) -> list[torch.Tensor]:
        return [self.chosen, self.chosen_lp, self.ranks, self.top_lp, self.top_ids]

    def build(self, host: list[torch.Tensor]) -> list[TokenLogprobs | None]:
        """Records from `host_tensors()` once they are on the host, one per batch row."""
        ch_l, chosen_l, ranks_l, top_lp_l, top_ids_l = (t.tolist() for t in host)
        out: list[TokenLogprobs | None] = [None] * self.num_rows
        for j, i in enumerate(self.rows):
            n = self.num_top[j]
            out[i] = TokenLogprobs(
                token_id=ch_l[j], logprob=chosen_l[j], rank=ranks_l[j],
                top_token_ids=top_ids_l[j][:n], top_logprobs=top_lp_l[j][:n],
            )
        return out


def gather_logprobs(
    logprobs: torch.Tensor, chosen: torch.Tensor, num_top: list[int | None]
) -> list[TokenLogprobs | None]:
    """Logprob records for rows that asked, read back at once (synchronous)."""
    if all(n is None for n in num_top):
        return [None] * len(num_top)
    d = DeviceLogprobs.gather(logprobs, chosen, num_top)
    return d.build([t.cpu() for t in d.host_tensors()])
