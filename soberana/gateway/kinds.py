"""What differs between backend kinds: how to probe them, what to scrape, which fields they take."""

from __future__ import annotations

from dataclasses import dataclass

# vLLM's metric names; Soberana's server exposes the same ones.
_VLLM_LOAD_METRICS = ("vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")


@dataclass(frozen=True)
class KindTraits:
    """How the gateway talks to one kind of OpenAI-compatible server."""

    health_path: str
    load_metrics: tuple[str, str] | None  # (waiting-queue gauge, KV-usage gauge 0..1) on /metrics
    cache_salt: bool  # accepts a `cache_salt` body field that keeps tenants' KV blocks apart
    stream_usage: bool  # honours `stream_options.include_usage`


TRAITS: dict[str, KindTraits] = {
    "soberana": KindTraits("/health", _VLLM_LOAD_METRICS, cache_salt=True, stream_usage=True),
    # vLLM >= 0.9 takes cache_salt for chat and completions.
    "vllm": KindTraits("/health", _VLLM_LOAD_METRICS, cache_salt=True, stream_usage=True),
    # llama.cpp's server names its gauges itself (exposed with --metrics).
    "llamacpp": KindTraits(
        "/health",
        ("llamacpp:requests_deferred", "llamacpp:kv_cache_usage_ratio"),
        cache_salt=False,
        stream_usage=False,
    ),
    "ollama": KindTraits("/v1/models", None, cache_salt=False, stream_usage=False),
    "openai": KindTraits("/v1/models", None, cache_salt=False, stream_usage=True),
}
