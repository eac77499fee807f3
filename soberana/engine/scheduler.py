"""The scheduler: one token budget per step shared by decodes and (chunked) prefills.

Its one currency is {request: num_new_tokens}. Running requests are served first in
priority order; when the pool runs dry the lowest-priority running request is preempted
(its blocks freed, to be recomputed later); waiting requests are then admitted while budget,
`max_num_seqs` and blocks allow.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from soberana.engine.kv_cache_manager import KVCacheManager
from soberana.engine.request import Request, RequestStatus

if TYPE_CHECKING:
    from soberana.engine.kv_offload import KVOffload


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int  # draft tokens included: the budget counts verified tokens
    draft_token_ids: list[int] = field(default_factory=list)  # speculative decoding

    @property
    def samples(self) -> bool:
        """True when this step reaches the end of the known tokens, so a token is sampled."""
        r = self.request
        return (r.num_computed_tokens + self.num_new_tokens - len(self.draft_token_ids)
                == r.num_tokens)


@dataclass
class SchedulerOutput:
    # Decodes (one new token) first, then prefill chunks: the attention kernels rely on it.
    scheduled: list[ScheduledRequest] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(
        self,
        kv: KVCacheManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        offload: KVOffload | None = None,
        long_prefill_token_threshold: int = 0,
    ) -> None:
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.long_prefill_token_threshold = long_prefill_token_threshold
        self.offload = offload
        self.waiting: list[Request] = []  # sorted by Request.sort_key()
        self.running: list[Request] = []  # sorted by Request.sort_key()
        self.loading: list[Request] = []  # admitted, blocks coming from the KV warehouse
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        bisect.insort(self.waiting, request, key=Request.sort_key)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.loading)

    def schedule(self) -> SchedulerOutput:
        if self.offload is not None:
            self._finish_loads()
        budget = self.max_num_batched_tokens
        out = SchedulerOutput()
        scheduled: list[ScheduledRequest] = []
        preempted = False

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if len(req.output_token_ids) >= req.max_tokens:
                i += 1  # async scheduling: its last token is in flight; it ends with it
                continue
            num_new = self._chunk(req.num_tokens - req.num_computed_tokens, budget)
            # Speculative decoding: a decode carries its drafts, as many as the budget allows.
            drafts = req.spec_token_ids[: budget - 1] if num_new == 1 else []
            num_new += len(drafts)
            while not self.kv.allocate_slots(req, num_new):
                victim = self.running.pop()  # lowest priority, latest arrival
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
            else:
                scheduled.append(ScheduledRequest(req, num_new, drafts))
                budget -= num_new
                i += 1

        # A step that had to preempt admits nobody: the pool is the bottleneck.
        if not preempted:
            budget = self._admit(scheduled, budget)

        scheduled.sort(key=lambda s: s.num_new_tokens != 1)  # stable: decodes first
        out.scheduled = scheduled
        if self.offload is not None:  # evicted blocks leave before the step overwrites them
            self.offload.flush_evictions()
        return out

    def _chunk(self, remaining: int, budget: int) -> int:
        """Tokens a request advances this step: what it has left, within the budget and,
        for a long prefill, within `long_prefill_token_threshold` (so a short prompt behind
        it, such as one whose history came back from the KV warehouse, need not wait for a
        whole budget-sized chunk)."""
        limit = self.long_prefill_token_threshold
        return min(remaining, budget, limit) if limit > 0 else min(remaining, budget)

    def _admit(self, scheduled: list[ScheduledRequest], budget: int) -> int:
        skipped: list[Request] = []
        while (self.waiting and budget > 0
               and len(self.running) + len(self.loading) < self.max_num_seqs):
            req = self.waiting[0]
            leader = req.leader
            if leader is not None and _prompt_pending(leader):
                skipped.append(self.waiting.pop(0))  # waits for its leader's prompt
                continue
            cached = self.kv.find_cached_prefix(req)
            if self.offload is not None:
                if req.warehouse_end is None:  # asked once: each lookup is a disk sighting
                    req.warehouse_end = len(cached) + self.offload.loadable_blocks(req, len(cached))
                if req.warehouse_end > len(cached):
                    if not self._start_load(req, cached, req.warehouse_end - len(cached)):
                        break  # the pool is full: retry when blocks free up
                    continue
            num_cached = len(cached) * self.kv.block_size
            num_new = self._chunk(req.num_tokens - num_cached, budget)
            if not self.kv.allocate_slots(req, num_new, cached):
                break
            self.waiting.pop(0)
            self.kv.record_lookup(req.num_tokens, num_cached)
            if self.offload is not None and req.num_cached_tokens < 0:
                self.offload.admitted(req, len(cached))
            req.num_computed_tokens = num_cached
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = num_cached
            if req.scheduled_time is None:
                req.scheduled_time = time.time()
            req.status = RequestStatus.RUNNING
            bisect.insort(self.running, req, key=Request.sort_key)
            scheduled.append(ScheduledRequest(req, num_new))
            budget -= num_new
        for req in skipped:
            bisect.insort(self.waiting, req, key=Request.sort_key)
        return budget

    def _start_load(self, req: Request, cached: list, n: int) -> bool:
        """Admit `req` into the loading state to copy in `n` blocks past its GPU hit;
        False when the pool cannot hold them yet."""
        if not self.kv.allocate_slots(req, n * self.kv.block_size, cached, register=False):
            return False
        self.waiting.pop(0)
        self.kv.record_lookup(req.num_tokens, len(cached) * self.kv.block_size)
        req.status = RequestStatus.LOADING
        if req.scheduled_time is None:
            req.scheduled_time = time.time()
        self.offload.start_load(req, len(cached), n)
        self.loading.append(req)
        return True

    def _finish_loads(self) -> None:
        for req, valid_blocks in self.offload.finished_loads():
            self.loading.remove(req)
            req.num_computed_tokens = valid_blocks * self.kv.block_size
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = req.num_computed_tokens
            req.status = RequestStatus.RUNNING
            bisect.insort(self.running, req, key=Request.sort_key)

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.spec_token_ids = []
        req.warehouse_end = None  # evicted blocks may be in the warehouse by now
        req.status = RequestStatus.PREEMPTED
        self.num_preemptions += 1
        bisect.insort(self.waiting, req, key=Request.sort_key)

    def finish(self, req: Request, status: RequestStatus) -> None:
        """Remove a request wherever it is and free its blocks."""
        req.status = status
        if self.offload is not None:
            self.offload.forget(req)
            if req in self.loading:
                self.loading.remove(req)
                self.offload.cancel(req)  # its blocks are freed once the copy has stopped
                return
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.kv.free(req)


def _prompt_pending(leader: Request) -> bool:
    """True while the leader has not yet been scheduled for its whole prompt."""
    if leader.status.finished:
        return False
    return leader.status != RequestStatus.RUNNING or (
        leader.num_computed_tokens < leader.num_prompt_tokens and not leader.output_token_ids
    )
