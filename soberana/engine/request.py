"""A request's state inside the engine core: one sequence (one sample of a prompt)."""

from __future__ import annotations

import enum

from soberana.engine.outputs import TokenLogprobs
from soberana.engine.sampling_params import SamplingParams

PLACEHOLDER = -1  # an output token sampled on the GPU whose id has not reached the host yet


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    LOADING = "loading"  # blocks being copied in from the KV warehouse
    RUNNING = "running"
    PREEMPTED = "preempted"  # blocks freed; waits to be recomputed from scratch
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (self.FINISHED_STOPPED, self.FINISHED_LENGTH, self.FINISHED_ABORTED)


class Request:
    """One sample of one prompt. Samples of an `n > 1` request share `request_id`."""

    def __init__(
        self,
        request_id: str,
        index: int,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float,
        priority: int,
        cache_salt: str | None,
        max_tokens: int,
        leader: Request | None = None,
    ) -> None:
        self.request_id = request_id
        self.index = index
        self.key = (request_id, index)
        self.prompt_token_ids = prompt_token_ids
        self.output_token_ids: list[int] = []
        self.params = params
        self.arrival_time = arrival_time
        self.priority = priority
        self.cache_salt = cache_salt
        self.max_tokens = max_tokens  # resolved against the context length
        # Samples 1..n-1 wait until sample 0 has scheduled its whole prompt, then reuse its
        # full KV blocks through the prefix cache instead of computing them again.
        self.leader = leader
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        # Async scheduling: output tokens already counted (their step is launched) whose ids
        # are still on the GPU. They sit at the end of output_token_ids as PLACEHOLDER.
        self.num_placeholders = 0
        self.num_cached_tokens = -1  # prefix-cache hit at first scheduling; -1 = not yet
        self.block_hashes: list[bytes] = []
        # Block index up to which the KV warehouse holds this prompt (None: not asked yet).
        self.warehouse_end: int | None = None
        self.scheduled_time: float | None = None
        self.stop_reason: int | None = None
        # Speculative decoding: this step's draft tokens (not part of the sequence until the
        # target accepts them; never hashed, never in the prefix cache).
        self.spec_token_ids: list[int] = []
        # Prompt logprobs accumulate over prefill chunks; sent with the first output.
        self.prompt_logprobs: list[TokenLogprobs | None] | None = (
            [None] if params.prompt_logprobs is not None and index == 0 else None
        )

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_known_tokens(self) -> int:
        """Tokens whose ids are known on the host (all but in-flight placeholders)."""
        return self.num_tokens - self.num_placeholders

    def token_slice(self, start: int, end: int) -> list[int]:
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p:end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - p]

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.prompt_logprobs is not None

    def sort_key(self) -> tuple[int, float, int]:
        """Scheduling order: lower priority value first, then arrival, then sample index."""
        return (self.priority, self.arrival_time, self.index)
