"""Load generation: a closed loop of C users, or open-loop arrivals (Poisson or gamma)."""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Awaitable, Callable, Iterator
from time import perf_counter

from soberana.bench.config import LoadPoint
from soberana.bench.request import RequestResult, RequestSpec
from soberana.bench.workloads import RequestSource


def arrival_intervals(rate: float, burstiness: float, rng: random.Random) -> Iterator[float]:
    """Seconds between arrivals: gamma with mean 1/rate and shape `burstiness`.

    Shape 1 is a Poisson process; below 1 arrivals are burstier, above 1 more regular (the
    coefficient of variation is 1/sqrt(burstiness)). An infinite rate sends at once.
    """
    if math.isinf(rate):
        while True:
            yield 0.0
    scale = 1.0 / (rate * burstiness)
    while True:
        yield rng.gammavariate(burstiness, scale)


class DispatchBudget:
    """How many more requests may start: up to `num_prompts`, and/or until `duration_s` is up."""

    def __init__(self, num_prompts: int | None, duration_s: float | None) -> None:
        self.remaining = num_prompts  # None: no count limit
        self.duration_s = duration_s
        self.deadline: float | None = None  # set by start()

    def start(self) -> None:
        """Start the clock for --duration."""
        if self.duration_s is not None:
            self.deadline = perf_counter() + self.duration_s

    def time_left(self) -> float | None:
        """Seconds until the deadline, or None without one."""
        return None if self.deadline is None else max(self.deadline - perf_counter(), 0.0)

    def take(self) -> bool:
        """Reserve one request; False once the count or the time is used up."""
        if self.deadline is not None and perf_counter() >= self.deadline:
            return False
        if self.remaining is not None:
            if self.remaining <= 0:
                return False
            self.remaining -= 1
        return True


class LoadDriver:
    """Runs one load point: pulls requests from a source and sends them as the load dictates."""

    def __init__(
        self,
        source: RequestSource,
        send: Callable[[RequestSpec], Awaitable[RequestResult]],
        budget: DispatchBudget,
        on_result: Callable[[RequestResult], None],
    ) -> None:
        self.source = source
        self.send = send
        self.budget = budget
        self.on_result = on_result
        self.results: list[RequestResult] = []

    async def run(self, point: LoadPoint, rng: random.Random) -> list[RequestResult]:
        """Send requests at `point` until the budget is spent; returns every result."""
        self.budget.start()
        if point.mode == "closed":
            await asyncio.gather(*(self._user() for _ in range(point.concurrency)))
        else:
            await self._arrivals(point, rng)
        return self.results

    async def _user(self) -> None:
        # Closed loop: each user sends its next request as soon as its previous one finishes.
        while self.budget.take():
            spec = await self._next_spec()
            if spec is None:
                return
            await self._one(spec, None)

    async def _arrivals(self, point: LoadPoint, rng: random.Random) -> None:
        # Open loop: requests start on a schedule, whether or not earlier ones have finished.
        # Times are absolute from the start, so a late wake-up does not slow the mean rate.
        slots = asyncio.Semaphore(point.concurrency) if point.concurrency else None
        tasks: set[asyncio.Task] = set()
        due = perf_counter()
        for interval in arrival_intervals(point.request_rate, point.burstiness, rng):
            due += interval
            # Behind schedule, still yield once: started requests keep making progress.
            await asyncio.sleep(max(due - perf_counter(), 0.0))
            if not self.budget.take():
                break
            spec = await self._next_spec()
            if spec is None:
                break
            task = asyncio.create_task(self._one(spec, slots))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)

    async def _next_spec(self) -> RequestSpec | None:
        left = self.budget.time_left()
        if left is None:
            return await self.source.next()
        try:
            # A multiturn user may still be thinking when the time is up.
            return await asyncio.wait_for(self.source.next(), left)
        except TimeoutError:
            return None

    async def _one(self, spec: RequestSpec, slots: asyncio.Semaphore | None) -> None:
        if slots is None:
            result = await self.send(spec)
        else:
            async with slots:  # --concurrency caps requests in flight in an open loop
                result = await self.send(spec)
        self.source.complete(result)
        self.results.append(result)
        self.on_result(result)
