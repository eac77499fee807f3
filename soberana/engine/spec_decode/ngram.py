"""Prompt lookup (n-gram) proposer: continue the sequence the way it continued before."""

from __future__ import annotations

from soberana.engine.request import Request
from soberana.engine.spec_decode.proposer import Proposer


class NgramProposer(Proposer):
    def __init__(self, k: int, n_min: int, n_max: int) -> None:
        self.k, self.n_min, self.n_max = k, n_min, n_max

    def propose(self, requests: list[Request], num_drafts: list[int]) -> list[list[int]]:
        return [self._lookup(r.token_slice(0, r.num_tokens), k) for r, k in
                zip(requests, num_drafts)]

    def _lookup(self, tokens: list[int], k: int) -> list[int]:
        """The tokens after the latest earlier occurrence of the longest suffix n-gram
        (n from n_max down to n_min), as vLLM's prompt lookup."""
        n_tokens = len(tokens)
        for n in range(min(self.n_max, n_tokens - 1), self.n_min - 1, -1):
            suffix = tokens[n_tokens - n:]
            first = suffix[0]
            # Scan back from the most recent candidate start: recent context predicts best.
            for start in range(n_tokens - n - 1, -1, -1):
                if tokens[start] == first and tokens[start:start + n] == suffix:
                    return tokens[start + n:start + n + k]
        return []
