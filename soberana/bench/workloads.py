"""Workloads: where each run's requests come from (`random`, `prefix`, `multiturn`, `file`)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from itertools import count, islice
from typing import Protocol

from soberana.bench.config import DEFAULT_OUTPUT_LEN, WorkloadConfig
from soberana.bench.dataset_file import load_dataset
from soberana.bench.multiturn import MultiTurnSource
from soberana.bench.request import RequestResult, RequestSpec
from soberana.bench.tokens import TokenCounter

DEFAULT_NUM_PROMPTS = 100  # random workload without --num-prompts or --duration
_DISTINCT_WORDS = 32  # prompts differ within their first words, so no cache block is shared


class RequestSource(Protocol):
    """Hands out requests; multiturn sources need each answer before the next round is ready."""

    async def next(self) -> RequestSpec:
        """The next request to send, waiting until one is ready."""
        ...

    def complete(self, result: RequestResult) -> None:
        """Called once per sent request, with what came back."""
        ...


class IterSource:
    """A source of independent single-turn requests."""

    def __init__(self, specs: Iterator[RequestSpec]) -> None:
        self.specs = specs

    async def next(self) -> RequestSpec:
        """The next request; single-turn workloads never wait."""
        return next(self.specs)

    def complete(self, result: RequestResult) -> None:
        """Single-turn requests do not depend on earlier answers."""


def random_requests(
    cfg: WorkloadConfig, counter: TokenCounter, rng: random.Random
) -> Iterator[RequestSpec]:
    """Endless distinct prompts of `input_len` tokens, none sharing a prefix with another."""
    output_len = cfg.output_len or DEFAULT_OUTPUT_LEN
    seen: set[tuple[str, ...]] = set()
    for i in count():
        n_in = cfg.input_len.sample_int(rng)
        text = counter.make_text(rng, n_in)
        head = tuple(text.split()[:_DISTINCT_WORDS])
        while head in seen:  # astronomically rare, but "every prompt distinct" is a promise
            text = counter.make_text(rng, n_in)
            head = tuple(text.split()[:_DISTINCT_WORDS])
        seen.add(head)
        yield RequestSpec(
            request_id=f"r{i}",
            messages=[{"role": "user", "content": text}],
            max_tokens=output_len.sample_int(rng),
            target_prompt_tokens=n_in,
        )


def prefix_requests(
    cfg: WorkloadConfig, counter: TokenCounter, rng: random.Random
) -> Iterator[RequestSpec]:
    """`num_prefixes` shared prefixes, each followed by `suffixes_per_prefix` distinct suffixes.

    Prompt = prefix (`prefix_len` tokens) + suffix (`input_len` tokens). Each cycle of
    num_prefixes x suffixes_per_prefix requests is shuffled; later cycles draw new suffixes.
    """
    output_len = cfg.output_len or DEFAULT_OUTPUT_LEN
    prefixes = [counter.make_text(rng, cfg.prefix_len) for _ in range(cfg.num_prefixes)]
    i = 0
    while True:
        order = [p for p in range(cfg.num_prefixes) for _ in range(cfg.suffixes_per_prefix)]
        rng.shuffle(order)
        for p in order:
            total = cfg.prefix_len + cfg.input_len.sample_int(rng)
            suffix = counter.make_text(rng, total, prefix=prefixes[p])
            yield RequestSpec(
                request_id=f"r{i}",
                messages=[{"role": "user", "content": prefixes[p] + suffix}],
                max_tokens=output_len.sample_int(rng),
                target_prompt_tokens=total,
                prefix=p,
            )
            i += 1


def file_requests(
    cfg: WorkloadConfig, counter: TokenCounter, rng: random.Random
) -> Iterator[RequestSpec]:
    """The dataset's entries in file order, repeated from the start when exhausted."""
    entries = load_dataset(cfg.dataset_path)
    i = 0
    while True:
        for entry in entries:
            if cfg.output_len is not None:
                max_tokens = cfg.output_len.sample_int(rng)
            elif entry.max_tokens is not None:
                max_tokens = entry.max_tokens
            elif entry.reply:
                max_tokens = max(counter.count_output(entry.reply), 1)
            else:
                max_tokens = DEFAULT_OUTPUT_LEN.sample_int(rng)
            messages = entry.messages
            yield RequestSpec(request_id=f"r{i}", messages=messages, max_tokens=max_tokens)
            i += 1


def natural_num_prompts(cfg: WorkloadConfig) -> int:
    """How many requests a run sends when neither --num-prompts nor --duration is given."""
    if cfg.name == "prefix":
        return cfg.num_prefixes * cfg.suffixes_per_prefix
    if cfg.name == "multiturn":
        return cfg.num_users * cfg.num_rounds
    if cfg.name == "file":
        return len(load_dataset(cfg.dataset_path))
    return DEFAULT_NUM_PROMPTS


def build_source(
    cfg: WorkloadConfig, counter: TokenCounter, seed: int | str, num_prompts: int | None
) -> RequestSource:
    """A fresh source for one run, seeded; prompts are built up front when their number is known."""
    rng = random.Random(seed)
    if cfg.name == "multiturn":
        return MultiTurnSource(cfg, counter, rng, cfg.output_len or DEFAULT_OUTPUT_LEN)
    make = {"random": random_requests, "prefix": prefix_requests, "file": file_requests}[cfg.name]
    specs = make(cfg, counter, rng)
    if num_prompts is not None:
        # Tokenizing while sending would slow the client down and skew its timings.
        specs = iter(list(islice(specs, num_prompts)))
    return IterSource(specs)
