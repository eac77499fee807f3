"""/metrics speaks vLLM's names, labels and buckets, and its numbers follow the traffic."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.server.helpers import metric

VLLM_TTFT_BUCKETS = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
]  # fmt: skip
VLLM_ITL_BUCKETS = [
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
]  # fmt: skip
VLLM_REQUEST_LATENCY_BUCKETS = [
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
    240.0, 480.0, 960.0, 1920.0, 7680.0,
]  # fmt: skip

GAUGES = ["vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"]
COUNTERS = [
    "vllm:prefix_cache_queries", "vllm:prefix_cache_hits", "vllm:prompt_tokens",
    "vllm:generation_tokens", "vllm:request_success", "vllm:num_preemptions",
]  # fmt: skip
HISTOGRAMS = {
    "vllm:time_to_first_token_seconds": VLLM_TTFT_BUCKETS,
    "vllm:inter_token_latency_seconds": VLLM_ITL_BUCKETS,
    "vllm:e2e_request_latency_seconds": VLLM_REQUEST_LATENCY_BUCKETS,
    "vllm:request_queue_time_seconds": VLLM_REQUEST_LATENCY_BUCKETS,
    # token counts: vLLM's 1-2-5 series up to max_model_len (256 here)
    "vllm:request_prompt_tokens": [1, 2, 5, 10, 20, 50, 100, 200],
    "vllm:request_generation_tokens": [1, 2, 5, 10, 20, 50, 100, 200],
}


def _families(server) -> dict:
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_metrics_have_vllm_names_types_and_model_label(server):
    families = _families(server)
    for name in GAUGES:
        assert families[name].type == "gauge"
    for name in COUNTERS:
        assert families[name].type == "counter"
        assert all(s.name == f"{name}_total" for s in families[name].samples)
    for name in HISTOGRAMS:
        assert families[name].type == "histogram"
    for name in GAUGES + COUNTERS + list(HISTOGRAMS):
        assert {s.labels["model_name"] for s in families[name].samples} == {"soberana-demo"}
    reasons = {s.labels["finished_reason"] for s in families["vllm:request_success"].samples}
    assert reasons == {"stop", "length", "abort", "error"}


def test_histograms_use_vllm_buckets(server):
    families = _families(server)
    for name, buckets in HISTOGRAMS.items():
        bounds = [
            float(s.labels["le"]) for s in families[name].samples if s.name.endswith("_bucket")
        ]
        assert bounds == [float(b) for b in buckets] + [float("inf")], name


def test_counters_and_histograms_move_as_requests_run(server):
    prompt = "Metrics count every token of this prompt"
    prompt_len = server.post("/tokenize", json={"prompt": prompt}).json()["count"]
    before = server.metrics()
    resp = server.post(
        "/v1/completions",
        json={"prompt": prompt, "max_tokens": 5, "ignore_eos": True, "temperature": 0},
    )
    assert resp.status_code == 200
    after = server.metrics()

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("vllm:prompt_tokens_total") == prompt_len
    assert delta("vllm:generation_tokens_total") == 5
    assert delta("vllm:request_success_total", finished_reason="length") == 1
    assert delta("vllm:prefix_cache_queries_total") >= prompt_len
    for name in ("vllm:time_to_first_token_seconds", "vllm:e2e_request_latency_seconds",
                 "vllm:request_queue_time_seconds", "vllm:request_prompt_tokens"):
        assert delta(f"{name}_count") == 1, name
    assert delta("vllm:request_prompt_tokens_sum") == prompt_len
    assert delta("vllm:request_generation_tokens_sum") == 5
    assert delta("vllm:inter_token_latency_seconds_count") == 4  # 5 tokens, 4 gaps
    assert delta("vllm:e2e_request_latency_seconds_sum") > 0
    # Idle again: nothing running, nothing waiting, no KV blocks held.
    assert metric(after, "vllm:num_requests_running") == 0
    assert metric(after, "vllm:num_requests_waiting") == 0
    assert metric(after, "vllm:kv_cache_usage_perc") == 0


def test_prefix_cache_hits_count_reused_prompt_tokens(server):
    prompt = " ".join(["Each full block is named by a hash of its tokens."] * 5)
    server.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1})
    before = server.metrics()
    server.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1})
    after = server.metrics()
    hits = metric(after, "vllm:prefix_cache_hits_total") - metric(before, "vllm:prefix_cache_hits_total")
    assert hits >= 32  # at least two full 16-token blocks found in the cache
