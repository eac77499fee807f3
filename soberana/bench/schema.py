"""The JSON Schema of summary.json (documented in docs/bench.md) and its validation."""

from __future__ import annotations

SCHEMA_VERSION = 1

_NUM = {"type": "number"}
_NUM_OR_NULL = {"type": ["number", "null"]}
_COUNT = {"type": "integer", "minimum": 0}

_STATS = {
    "description": "Milliseconds over the successful requests; null when there is no sample.",
    "type": ["object", "null"],
    "required": ["count", "mean", "std", "min", "max"],
    "properties": {"count": _COUNT, "mean": _NUM, "std": _NUM, "min": _NUM, "max": _NUM},
    "patternProperties": {r"^p[0-9]+(\.[0-9]+)?$": _NUM},
    "additionalProperties": False,
}

_RUN = {
    "type": "object",
    "required": [
        "load",
        "duration_s",
        "requests",
        "tokens",
        "throughput",
        "latency_ms",
        "goodput",
        "server_metrics",
        "client_cpu_s",
    ],
    "additionalProperties": False,
    "properties": {
        "load": {
            "type": "object",
            "required": ["mode", "concurrency", "request_rate", "burstiness"],
            "additionalProperties": False,
            "properties": {
                "mode": {"enum": ["closed", "open"]},
                "concurrency": {"type": ["integer", "null"], "minimum": 1},
                "request_rate": {
                    "oneOf": [
                        {"type": "number", "exclusiveMinimum": 0},
                        {"const": "inf"},
                        {"type": "null"},
                    ]
                },
                "burstiness": {"type": "number", "exclusiveMinimum": 0},
            },
        },
        "duration_s": {"type": "number", "minimum": 0},
        "client_cpu_s": {
            "description": "CPU seconds the benchmark client used during the run",
            "type": "number",
            "minimum": 0,
        },
        "requests": {
            "type": "object",
            "required": ["sent", "completed", "failed", "errors"],
            "additionalProperties": False,
            "properties": {
                "sent": _COUNT,
                "completed": _COUNT,
                "failed": _COUNT,
                "errors": {
                    "description": "Failed requests by error type (see docs/bench.md).",
                    "type": "object",
                    "additionalProperties": {"type": "integer", "minimum": 1},
                },
            },
        },
        "tokens": {
            "type": "object",
            "required": ["prompt", "output", "cached_prompt", "sources"],
            "additionalProperties": False,
            "properties": {
                "prompt": _COUNT,
                "output": _COUNT,
                "cached_prompt": {"type": ["integer", "null"], "minimum": 0},
                "sources": {
                    "type": "object",
                    "propertyNames": {"enum": ["usage", "tokenizer", "approximate"]},
                    "additionalProperties": _COUNT,
                },
            },
        },
        "throughput": {
            "type": "object",
            "required": ["requests_per_s", "output_tokens_per_s", "total_tokens_per_s"],
            "additionalProperties": False,
            "properties": {
                "requests_per_s": _NUM,
                "output_tokens_per_s": _NUM,
                "total_tokens_per_s": _NUM,
            },
        },
        "latency_ms": {
            "type": "object",
            "required": ["ttft", "tpot", "itl", "e2e", "queue_time"],
            "additionalProperties": False,
            "properties": {k: _STATS for k in ("ttft", "tpot", "itl", "e2e", "queue_time")},
        },
        "goodput": {
            "type": ["object", "null"],
            "required": ["slo_ms", "good_requests", "requests_per_s", "fraction"],
            "additionalProperties": False,
            "properties": {
                "slo_ms": {
                    "type": "object",
                    "propertyNames": {"enum": ["ttft", "tpot", "e2e"]},
                    "additionalProperties": _NUM,
                },
                "good_requests": _COUNT,
                "requests_per_s": _NUM,
                "fraction": {"type": "number", "minimum": 0, "maximum": 1},
            },
        },
        "server_metrics": {
            "type": ["object", "null"],
            "required": [
                "url",
                "prefix_cache_queries",
                "prefix_cache_hits",
                "prefix_cache_hit_rate",
                "kv_cache_usage_before",
                "kv_cache_usage_after",
                "kv_cache_usage_peak",
                "mean_queue_time_ms",
                "num_preemptions",
            ],
            "additionalProperties": False,
            "properties": {
                "url": {"type": "string"},
                "prefix_cache_queries": _NUM_OR_NULL,
                "prefix_cache_hits": _NUM_OR_NULL,
                "prefix_cache_hit_rate": _NUM_OR_NULL,
                "kv_cache_usage_before": _NUM_OR_NULL,
                "kv_cache_usage_after": _NUM_OR_NULL,
                "kv_cache_usage_peak": _NUM_OR_NULL,
                "mean_queue_time_ms": _NUM_OR_NULL,
                "num_preemptions": _NUM_OR_NULL,
            },
        },
    },
}

SUMMARY_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "soberana bench summary.json",
    "type": "object",
    "required": [
        "schema_version",
        "tool",
        "command_line",
        "started_at",
        "finished_at",
        "host",
        "target",
        "workload",
        "settings",
        "runs",
    ],
    "additionalProperties": False,
    "properties": {
        "schema_version": {"const": SCHEMA_VERSION},
        "tool": {
            "type": "object",
            "required": ["name", "version"],
            "properties": {"name": {"type": "string"}, "version": {"type": "string"}},
        },
        "command_line": {
            "description": "argv, with the --api-key value redacted",
            "type": "array",
            "items": {"type": "string"},
        },
        "started_at": {"type": "string", "format": "date-time"},
        "finished_at": {"type": "string", "format": "date-time"},
        "host": {
            "type": "object",
            "required": ["hostname", "platform", "python"],
            "properties": {
                "hostname": {"type": "string"},
                "platform": {"type": "string"},
                "python": {"type": "string"},
            },
        },
        "target": {
            "type": "object",
            "required": ["base_url", "endpoint", "model", "metrics_url", "extra_body", "timeout_s"],
            "properties": {
                "base_url": {"type": "string"},
                "endpoint": {"enum": ["chat", "completions"]},
                "model": {"type": ["string", "null"]},
                "metrics_url": {"type": ["string", "null"]},
                "extra_body": {"type": "object"},
                "timeout_s": {"type": "number", "exclusiveMinimum": 0},
            },
        },
        "workload": {
            "type": "object",
            "required": ["name", "output_len", "tokenizer", "exact_lengths"],
            "properties": {
                "name": {"enum": ["random", "prefix", "multiturn", "file"]},
                "tokenizer": {"type": "string"},
                "exact_lengths": {"type": "boolean"},
            },
        },
        "settings": {
            "type": "object",
            "required": ["num_prompts", "duration_s", "warmup", "seed", "percentiles"],
            "properties": {
                "num_prompts": {"type": ["integer", "null"], "minimum": 1},
                "duration_s": _NUM_OR_NULL,
                "warmup": _COUNT,
                "seed": {"type": "integer"},
                "percentiles": {"type": "array", "items": _NUM, "minItems": 1},
            },
        },
        "runs": {"type": "array", "items": _RUN, "minItems": 1},
    },
}


def validate_summary(summary: dict) -> None:
    """Raise jsonschema.ValidationError if `summary` does not follow SUMMARY_SCHEMA."""
    import jsonschema  # only needed when writing or comparing files

    jsonschema.validate(summary, SUMMARY_SCHEMA, format_checker=jsonschema.FormatChecker())
