"""The proposer interface: token ids in, draft token ids out.

A proposer sees the requests about to decode and returns up to `num_drafts[i]` guessed next
tokens for each. Drafts are the proposer's argmax (q is one-hot), which the rejection
sampler treats exactly; a proposer with draft probabilities (an EAGLE head sampling its
drafts) would return them too and the rejection sampler already takes a q.
"""

from __future__ import annotations

from soberana.engine.request import Request


class Proposer:
    def propose(self, requests: list[Request], num_drafts: list[int]) -> list[list[int]]:
        raise NotImplementedError

    def forget_except(self, live: set[tuple[str, int]]) -> None:
        """Drop state (a draft KV cache) of requests no longer running."""
