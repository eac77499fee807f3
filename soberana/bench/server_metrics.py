"""The server's own view of a run, from its Prometheus `/metrics` (vLLM metric names)."""

from __future__ import annotations

import asyncio
import math
import re

import aiohttp

# Current vLLM names first, then the names of vLLM releases before the V1 engine.
_PREFIX_QUERIES = ("vllm:prefix_cache_queries_total", "vllm:gpu_prefix_cache_queries_total")
_PREFIX_HITS = ("vllm:prefix_cache_hits_total", "vllm:gpu_prefix_cache_hits_total")
_KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
_QUEUE_SUM = ("vllm:request_queue_time_seconds_sum",)
_QUEUE_COUNT = ("vllm:request_queue_time_seconds_count",)
_PREEMPTIONS = ("vllm:num_preemptions_total",)
_WANTED = frozenset(
    _PREFIX_QUERIES + _PREFIX_HITS + _KV_USAGE + _QUEUE_SUM + _QUEUE_COUNT + _PREEMPTIONS
)

_NAME = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
SAMPLE_INTERVAL_S = 1.0  # how often KV usage is read during a run, to find its peak


def parse_exposition(text: str) -> dict[str, list[float]]:
    """Values of the metrics this tool reads, one per label set, from Prometheus text format.

    A deliberately small parser: it runs on the client's event loop during the run, where a
    full parse of a large /metrics page would delay the timestamps being taken.
    """
    found: dict[str, list[float]] = {}
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue
        name = _NAME.match(line).group(0)
        if name not in _WANTED:
            continue
        # The value follows the label set (whose quoted values may hold spaces); a
        # timestamp may follow the value.
        rest = line[len(name) :]
        if rest.startswith("{"):
            rest = rest.rpartition("}")[2]
        try:
            found.setdefault(name, []).append(float(rest.split()[0]))
        except (ValueError, IndexError):
            continue
    return found


def _total(sample: dict[str, list[float]], names: tuple[str, ...]) -> float | None:
    # Counters add up over label sets (several models or engines behind one server).
    for name in names:
        if name in sample:
            return sum(sample[name])
    return None


def _highest(sample: dict[str, list[float]], names: tuple[str, ...]) -> float | None:
    # A usage gauge per engine: the fullest one is what limits the server.
    for name in names:
        if name in sample:
            return max(sample[name])
    return None


async def scrape(session: aiohttp.ClientSession, url: str) -> dict[str, list[float]] | None:
    """Read `url` once; None when it is unreachable or not Prometheus text."""
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=10)) as resp:
            if resp.status != 200:
                return None
            return parse_exposition(await resp.text(errors="replace"))
    except (aiohttp.ClientError, TimeoutError):
        return None


class MetricsWatcher:
    """Reads /metrics before, during (for the peak KV usage) and after one run."""

    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session = session
        self.url = url
        self.before: dict[str, list[float]] | None = None
        self.kv_samples: list[float] = []
        self.task: asyncio.Task | None = None

    async def start(self) -> None:
        """Take the `before` reading and start sampling KV usage."""
        self.before = await scrape(self.session, self.url)
        if self.before:
            self._record_kv(self.before)
            self.task = asyncio.create_task(self._sample())

    async def stop(self) -> dict | None:
        """Take the `after` reading; the run's server metrics, or None if there are none."""
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        if not self.before:
            return None
        after = await scrape(self.session, self.url)
        if not after:
            return None
        self._record_kv(after)
        return self._report(self.before, after)

    async def _sample(self) -> None:
        while True:
            await asyncio.sleep(SAMPLE_INTERVAL_S)
            sample = await scrape(self.session, self.url)
            if sample:
                self._record_kv(sample)

    def _record_kv(self, sample: dict[str, list[float]]) -> None:
        usage = _highest(sample, _KV_USAGE)
        if usage is not None and math.isfinite(usage):
            self.kv_samples.append(usage)

    def _report(self, before: dict, after: dict) -> dict | None:
        def delta(names: tuple[str, ...]) -> float | None:
            a, b = _total(before, names), _total(after, names)
            return None if a is None or b is None else b - a

        queries, hits = delta(_PREFIX_QUERIES), delta(_PREFIX_HITS)
        queue_sum, queue_count = delta(_QUEUE_SUM), delta(_QUEUE_COUNT)
        report = {
            "url": self.url,
            "prefix_cache_queries": queries,
            "prefix_cache_hits": hits,
            "prefix_cache_hit_rate": hits / queries if queries and hits is not None else None,
            "kv_cache_usage_before": _highest(before, _KV_USAGE),
            "kv_cache_usage_after": _highest(after, _KV_USAGE),
            "kv_cache_usage_peak": max(self.kv_samples) if self.kv_samples else None,
            "mean_queue_time_ms": 1000.0 * queue_sum / queue_count
            if queue_count and queue_sum is not None
            else None,
            "num_preemptions": delta(_PREEMPTIONS),
        }
        if all(v is None for k, v in report.items() if k != "url"):
            return None  # reachable, but no vLLM-style metric on it
        return report
