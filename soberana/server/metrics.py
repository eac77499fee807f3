"""Prometheus metrics with vLLM's names, buckets and labels, so its dashboards and alerts work."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from soberana.engine.outputs import SchedulerStats
from soberana.kv.metrics import KVWarehouseCollector

# "error": the request ended because the engine failed (vLLM's name for it).
FINISH_REASONS = ("stop", "length", "abort", "error")

# vLLM v1's buckets (vllm/v1/metrics/loggers.py).
TTFT_BUCKETS = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
]  # fmt: skip
TOKEN_LATENCY_BUCKETS = [
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
]  # fmt: skip
# vLLM's cudagraph-size buckets for vllm:iteration_tokens_total.
ITERATION_TOKEN_BUCKETS = [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]
REQUEST_LATENCY_BUCKETS = [
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
    240.0, 480.0, 960.0, 1920.0, 7680.0,
]  # fmt: skip


@dataclass
class RequestTimes:
    """One request's timeline (time.time() seconds) and token counts, for its histograms."""

    arrival: float
    prompt_tokens: int
    n: int
    max_tokens: int
    scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    generated: int = 0
    generated_per_sample: dict[int, int] = field(default_factory=dict)  # sample index -> tokens


def build_1_2_5_buckets(max_value: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to max_value (vLLM's token-count buckets)."""
    buckets, exponent = [], 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > max_value:
                return buckets
            buckets.append(value)
        exponent += 1


class ServerMetrics:
    """The server's metrics in their own registry; `model_name` and `engine` label every one."""

    def __init__(
        self, model_name: str, max_model_len: int, cache_config: dict[str, str] | None = None
    ) -> None:
        # vLLM exposes no `_created` series; without this every counter would gain one.
        disable_created_metrics()
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ["model_name", "engine"]
        values = [model_name, "0"]
        token_buckets = build_1_2_5_buckets(max_model_len)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=self.registry).labels(*values)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=self.registry).labels(*values)

        def histogram(name: str, doc: str, buckets: list[float]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=self.registry).labels(
                *values
            )

        self.num_requests_running = gauge(
            "vllm:num_requests_running", "Number of requests in model execution batches."
        )
        self.num_requests_waiting = gauge(
            "vllm:num_requests_waiting", "Number of requests waiting to be processed."
        )
        self.kv_cache_usage = gauge(
            "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage."
        )
        self.prefix_cache_queries = counter(
            "vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens."
        )
        self.prefix_cache_hits = counter(
            "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens."
        )
        self.num_preemptions = counter(
            "vllm:num_preemptions", "Cumulative number of preemption from the engine."
        )
        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        # Speculative decoding (vLLM's names); they stay at 0 without a speculative_config.
        self.spec_decode_num_drafts = counter(
            "vllm:spec_decode_num_drafts", "Number of spec decoding drafts.")
        self.spec_decode_num_draft_tokens = counter(
            "vllm:spec_decode_num_draft_tokens", "Number of draft tokens.")
        self.spec_decode_num_accepted_tokens = counter(
            "vllm:spec_decode_num_accepted_tokens", "Number of accepted tokens.")
        self._spec_per_pos = Counter(
            "vllm:spec_decode_num_accepted_tokens_per_pos",
            "Accepted tokens per draft position.", labels + ["position"],
            registry=self.registry)
        self._spec_labels = values
        self.generation_tokens = counter(
            "vllm:generation_tokens", "Number of generation tokens processed."
        )
        success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            labels + ["finished_reason"],
            registry=self.registry,
        )
        self.request_success = {r: success.labels(*values, r) for r in FINISH_REASONS}
        self.request_prompt_tokens = histogram(
            "vllm:request_prompt_tokens", "Number of prefill tokens processed.", token_buckets
        )
        self.request_generation_tokens = histogram(
            "vllm:request_generation_tokens", "Number of generation tokens processed.", token_buckets
        )
        self.request_params_n = histogram(
            "vllm:request_params_n", "Histogram of the n request parameter.", [1, 2, 5, 10, 20]
        )
        self.request_params_max_tokens = histogram(
            "vllm:request_params_max_tokens",
            "Histogram of the max_tokens request parameter.",
            token_buckets,
        )
        self.time_to_first_token = histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            TTFT_BUCKETS,
        )
        self.inter_token_latency = histogram(
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            TOKEN_LATENCY_BUCKETS,
        )
        self.time_per_output_token = histogram(
            "vllm:time_per_output_token_seconds",
            "Histogram of time per output token in seconds.",
            TOKEN_LATENCY_BUCKETS,
        )
        self.e2e_request_latency = histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.request_queue_time = histogram(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.request_inference_time = histogram(
            "vllm:request_inference_time_seconds",
            "Histogram of time spent in RUNNING phase for request.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.request_prefill_time = histogram(
            "vllm:request_prefill_time_seconds",
            "Histogram of time spent in PREFILL phase for request.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.request_decode_time = histogram(
            "vllm:request_decode_time_seconds",
            "Histogram of time spent in DECODE phase for request.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.request_time_per_output_token = histogram(
            "vllm:request_time_per_output_token_seconds",
            "Histogram of time_per_output_token_seconds per request.",
            TOKEN_LATENCY_BUCKETS,
        )
        self.request_max_num_generation_tokens = histogram(
            "vllm:request_max_num_generation_tokens",
            "Histogram of maximum number of requested generation tokens.",
            token_buckets,
        )
        self.iteration_tokens = histogram(
            "vllm:iteration_tokens_total",
            "Histogram of number of tokens per engine_step.",
            ITERATION_TOKEN_BUCKETS,
        )
        # The warehouse's prefix lookups in vLLM's KV-connector names (tokens, like the GPU's).
        self.external_prefix_cache_queries = counter(
            "vllm:external_prefix_cache_queries",
            "External prefix cache queries from KV connector cross-instance cache sharing, in "
            "terms of number of queried tokens.",
        )
        self.external_prefix_cache_hits = counter(
            "vllm:external_prefix_cache_hits",
            "External prefix cache hits from KV connector cross-instance cache sharing, in "
            "terms of number of cached tokens.",
        )
        self.block_size = int((cache_config or {}).get("block_size", 0))
        if cache_config is not None:
            info = Gauge("vllm:cache_config_info", "Information of the LLMEngine CacheConfig",
                         sorted(cache_config), registry=self.registry)
            info.labels(**cache_config).set(1)
        self._last_stats = SchedulerStats()
        # The KV warehouse's own metrics (soberana:kv_*), when the engine runs tiers.
        self.registry.register(
            KVWarehouseCollector(lambda: self._last_stats.kv_warehouse, {"model_name": model_name})
        )

    def record_scheduler_stats(self, stats: SchedulerStats) -> None:
        """Set the gauges; advance the engine's cumulative counters by what is new."""
        self.num_requests_running.set(stats.num_running_reqs)
        self.num_requests_waiting.set(stats.num_waiting_reqs)
        self.kv_cache_usage.set(stats.kv_cache_usage)
        last = self._last_stats
        self.prefix_cache_queries.inc(max(0, stats.prefix_cache_queries - last.prefix_cache_queries))
        self.prefix_cache_hits.inc(max(0, stats.prefix_cache_hits - last.prefix_cache_hits))
        self.num_preemptions.inc(max(0, stats.num_preemptions - last.num_preemptions))
        if stats.kv_warehouse is not None and self.block_size:
            was = last.kv_warehouse
            blocks = stats.kv_warehouse.lookup_blocks - (was.lookup_blocks if was else 0)
            hits = stats.kv_warehouse.lookup_hit_blocks - (was.lookup_hit_blocks if was else 0)
            self.external_prefix_cache_queries.inc(max(0, blocks) * self.block_size)
            self.external_prefix_cache_hits.inc(max(0, hits) * self.block_size)
        spec, spec_last = stats.spec_decoding, last.spec_decoding
        if spec is not None:
            def new(name: str) -> int:
                return getattr(spec, name) - (getattr(spec_last, name) if spec_last else 0)

            self.spec_decode_num_drafts.inc(max(0, new("num_drafts")))
            self.spec_decode_num_draft_tokens.inc(max(0, new("num_draft_tokens")))
            self.spec_decode_num_accepted_tokens.inc(max(0, new("num_accepted_tokens")))
            before = spec_last.num_accepted_tokens_per_pos if spec_last else []
            for pos, n in enumerate(spec.num_accepted_tokens_per_pos):
                prev = before[pos] if pos < len(before) else 0
                self._spec_per_pos.labels(*self._spec_labels, str(pos)).inc(max(0, n - prev))
        self._last_stats = stats

    def record_iteration(self, before: SchedulerStats, after: SchedulerStats) -> None:
        """Tokens one engine step computed (prompt and generated), from cumulative stats."""
        tokens = (after.prompt_tokens + after.generation_tokens
                  - before.prompt_tokens - before.generation_tokens)
        if tokens > 0:
            self.iteration_tokens.observe(tokens)

    def record_tokens(
        self, times: RequestTimes, now: float, num_new: int, scheduled: float | None,
        index: int = 0,
    ) -> None:
        """New tokens of one request arrived from the engine step that ended at `now`
        (the generation_tokens counter is advanced once per step by the caller)."""
        if scheduled is not None and times.scheduled is None:
            times.scheduled = scheduled
        if times.first_token is None:
            times.first_token = now
            self.time_to_first_token.observe(now - times.arrival)
            self.prompt_tokens.inc(times.prompt_tokens)
        elif now != times.last_token:  # samples of one request share a step: one interval
            self.inter_token_latency.observe(now - times.last_token)
        times.last_token = now
        times.generated += num_new
        times.generated_per_sample[index] = times.generated_per_sample.get(index, 0) + num_new

    def record_samples_finished(self, reasons: list[str]) -> None:
        """Some samples of a still-running request finished (n > 1)."""
        for reason in reasons:
            self.request_success[reason].inc()

    def record_finished(self, times: RequestTimes, now: float, reasons: list[str]) -> None:
        """The request is over; `reasons` holds the finish reason of each sample not yet counted."""
        self.record_samples_finished(reasons)
        self.e2e_request_latency.observe(now - times.arrival)
        self.request_prompt_tokens.observe(times.prompt_tokens)
        self.request_generation_tokens.observe(times.generated)
        self.request_max_num_generation_tokens.observe(
            max(times.generated_per_sample.values(), default=0)
        )
        self.request_params_n.observe(times.n)
        self.request_params_max_tokens.observe(times.max_tokens)
        if times.scheduled is not None:
            self.request_queue_time.observe(max(0.0, times.scheduled - times.arrival))
            self.request_inference_time.observe(max(0.0, now - times.scheduled))
            if times.first_token is not None:
                self.request_prefill_time.observe(max(0.0, times.first_token - times.scheduled))
        if times.first_token is not None:
            decode = now - times.first_token
            self.request_decode_time.observe(decode)
            if times.generated > 1:
                self.time_per_output_token.observe(decode / (times.generated - 1))
                self.request_time_per_output_token.observe(decode / (times.generated - 1))

    def record_pooling(self, prompt_tokens: int, seconds: float) -> None:
        """An embedding or scoring request (any number of inputs) finished."""
        self.prompt_tokens.inc(prompt_tokens)
        self.request_prompt_tokens.observe(prompt_tokens)
        self.e2e_request_latency.observe(seconds)
        self.request_success["stop"].inc()

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
