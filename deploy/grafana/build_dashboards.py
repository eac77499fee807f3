"""Writes the Grafana dashboards in this folder from one place (run after editing a panel).

`python deploy/grafana/build_dashboards.py` rewrites soberana-*.json. Every panel's queries are
run against a real Prometheus in CI (tests/deploy/test_dashboards.py), so a renamed metric
fails a test instead of leaving an empty panel for the on-call engineer.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).parent
DS = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"


def q(expr: str, legend: str = "") -> dict:
    return {"expr": expr, "legendFormat": legend}


def panel(title: str, unit: str, *targets: dict, kind: str = "timeseries", description: str = "") -> dict:
    return {"title": title, "type": kind, "unit": unit, "targets": list(targets),
            "description": description}


def quantiles(metric: str, selector: str, by: str = "model_name") -> list[dict]:
    return [q(f"histogram_quantile({p}, sum by (le, {by}) (rate({metric}_bucket{{{selector}}}[{RATE}])))",
              f"p{int(p * 100)} {{{{{by}}}}}") for p in (0.5, 0.95, 0.99)]


def variable(name: str, query: str, label: str | None = None) -> dict:
    return {"name": name, "label": label or name, "type": "query", "datasource": DS,
            "query": {"query": query, "refId": f"var-{name}"}, "definition": query,
            "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*",
            "current": {"selected": True, "text": "All", "value": "$__all"}}


def dashboard(uid: str, title: str, description: str, variables: list[dict],
              rows: list[tuple[str, list[dict]]]) -> dict:
    panels, y, pid = [], 0, 1
    for row_title, row_panels in rows:
        panels.append({"type": "row", "title": row_title, "id": pid, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        pid += 1
        y += 1
        for i, p in enumerate(row_panels):
            width = 24 // min(3, len(row_panels)) if len(row_panels) < 3 else 8
            built = {
                "id": pid, "type": p["type"], "title": p["title"], "description": p["description"],
                "datasource": DS,
                "gridPos": {"h": 8, "w": width, "x": (i % 3) * width, "y": y + (i // 3) * 8},
                "fieldConfig": {"defaults": {"unit": p["unit"]}, "overrides": []},
                "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
                "targets": [{"datasource": DS, "refId": chr(ord("A") + k), "expr": t["expr"],
                             "legendFormat": t["legendFormat"], "range": True}
                            for k, t in enumerate(p["targets"])],
            }
            panels.append(built)
            pid += 1
        y += 8 * ((len(row_panels) + 2) // 3)
    datasource = {"name": "datasource", "label": "Data source", "type": "datasource",
                  "query": "prometheus", "current": {}}
    return {
        "uid": uid, "title": title, "description": description, "tags": ["soberana"],
        "schemaVersion": 39, "version": 1, "editable": True, "graphTooltip": 1,
        "time": {"from": "now-1h", "to": "now"}, "refresh": "30s", "timezone": "",
        "templating": {"list": [datasource, *variables]},
        "annotations": {"list": []}, "links": [], "panels": panels,
    }


M = 'model_name=~"$model_name", instance=~"$instance"'
ENGINE = dashboard(
    "soberana-engine", "Soberana / Engine",
    "vLLM-named engine metrics of `soberana serve` (work unchanged on vLLM).",
    [variable("model_name", "label_values(vllm:num_requests_running, model_name)", "Model"),
     variable("instance", 'label_values(vllm:num_requests_running{model_name=~"$model_name"}, instance)', "Instance")],
    [
        ("Load", [
            panel("Engine up", "none", q("soberana:engine_up{instance=~\"$instance\"}", "{{instance}}"),
                  kind="stat", description="0: starting, or the engine core died (EngineDown)."),
            panel("Requests running / waiting", "none",
                  q(f"sum by (model_name) (vllm:num_requests_running{{{M}}})", "running {{model_name}}"),
                  q(f"sum by (model_name) (vllm:num_requests_waiting{{{M}}})", "waiting {{model_name}}")),
            panel("KV cache usage", "percentunit", q(f"vllm:kv_cache_usage_perc{{{M}}}", "{{instance}}"),
                  description="Pages above 95% for 3m (KVCacheFull)."),
        ]),
        ("Latency", [
            panel("Time to first token", "s", *quantiles("vllm:time_to_first_token_seconds", M),
                  description="TTFTP95OverSLO pages when p95 exceeds soberana:slo_ttft_p95_seconds for 5m."),
            panel("Inter-token latency", "s", *quantiles("vllm:inter_token_latency_seconds", M)),
            panel("Time per output token (per request)", "s",
                  *quantiles("vllm:request_time_per_output_token_seconds", M)),
            panel("End-to-end request latency", "s", *quantiles("vllm:e2e_request_latency_seconds", M)),
            panel("Queue time", "s", *quantiles("vllm:request_queue_time_seconds", M)),
            panel("Prefill / decode time p95", "s",
                  q(f"histogram_quantile(0.95, sum by (le) (rate(vllm:request_prefill_time_seconds_bucket{{{M}}}[{RATE}])))", "prefill"),
                  q(f"histogram_quantile(0.95, sum by (le) (rate(vllm:request_decode_time_seconds_bucket{{{M}}}[{RATE}])))", "decode")),
        ]),
        ("Throughput", [
            panel("Tokens per second", "short",
                  q(f"sum(rate(vllm:prompt_tokens_total{{{M}}}[{RATE}]))", "prompt"),
                  q(f"sum(rate(vllm:generation_tokens_total{{{M}}}[{RATE}]))", "generation")),
            panel("Finished requests by reason", "reqps",
                  q(f"sum by (finished_reason) (rate(vllm:request_success_total{{{M}}}[{RATE}]))", "{{finished_reason}}")),
            panel("Tokens per engine step", "short", *quantiles("vllm:iteration_tokens_total", M)),
            panel("Prefix cache hit rate", "percentunit",
                  q(f"sum(rate(vllm:prefix_cache_hits_total{{{M}}}[{RATE}])) / sum(rate(vllm:prefix_cache_queries_total{{{M}}}[{RATE}]))", "GPU pool"),
                  q(f"sum(rate(vllm:external_prefix_cache_hits_total{{{M}}}[{RATE}])) / sum(rate(vllm:external_prefix_cache_queries_total{{{M}}}[{RATE}]))", "KV warehouse")),
            panel("Preemptions", "short", q(f"sum(rate(vllm:num_preemptions_total{{{M}}}[{RATE}]))", "preemptions/s"),
                  description="PreemptionStorm warns above 0.5/s for 5m."),
            panel("Prompt / generation length p95", "short",
                  q(f"histogram_quantile(0.95, sum by (le) (rate(vllm:request_prompt_tokens_bucket{{{M}}}[{RATE}])))", "prompt"),
                  q(f"histogram_quantile(0.95, sum by (le) (rate(vllm:request_generation_tokens_bucket{{{M}}}[{RATE}])))", "generation"),
                  q(f"histogram_quantile(0.95, sum by (le) (rate(vllm:request_max_num_generation_tokens_bucket{{{M}}}[{RATE}])))", "max of n samples")),
        ]),
    ],
)

G = 'Hostname=~"$Hostname", gpu=~"$gpu"'
GPU = dashboard(
    "soberana-gpu", "Soberana / GPU",
    "DCGM-named GPU telemetry from `soberana serve`, `soberana telemetry` or dcgm-exporter.",
    [variable("Hostname", "label_values(DCGM_FI_DEV_GPU_TEMP, Hostname)", "Host"),
     variable("gpu", 'label_values(DCGM_FI_DEV_GPU_TEMP{Hostname=~"$Hostname"}, gpu)', "GPU")],
    [
        ("Memory", [
            panel("Device memory used", "percentunit",
                  q(f"DCGM_FI_DEV_FB_USED{{{G}}} / (DCGM_FI_DEV_FB_USED{{{G}}} + DCGM_FI_DEV_FB_FREE{{{G}}})", "{{Hostname}} gpu {{gpu}}"),
                  description="GPUMemoryHigh pages above 92% for 2m."),
            panel("Memory by owner", "bytes",
                  q(f"soberana:gpu_memory_used_bytes{{{G}}}", "{{Hostname}} gpu {{gpu}} {{owner}}"),
                  description="owner=other: processes besides Soberana, plus driver memory."),
            panel("Past --gpu-memory-utilization", "none",
                  q(f"soberana:gpu_memory_over_threshold{{{G}}}", "{{Hostname}} gpu {{gpu}}"),
                  q(f"increase(soberana:gpu_memory_threshold_crossings_total{{{G}}}[1h])", "crossings/1h {{gpu}}")),
        ]),
        ("Load and clocks", [
            panel("GPU utilization", "percent", q(f"DCGM_FI_DEV_GPU_UTIL{{{G}}}", "{{Hostname}} gpu {{gpu}}")),
            panel("SM / memory clock", "hertz",
                  q(f"DCGM_FI_DEV_SM_CLOCK{{{G}}} * 1e6", "SM {{gpu}}"),
                  q(f"DCGM_FI_DEV_MEM_CLOCK{{{G}}} * 1e6", "memory {{gpu}}")),
            panel("NVLink throughput", "Bps",
                  q(f"rate(DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL{{{G}}}[{RATE}]) * 1024", "{{Hostname}} gpu {{gpu}}")),
        ]),
        ("Heat and power", [
            panel("Temperature", "celsius", q(f"DCGM_FI_DEV_GPU_TEMP{{{G}}}", "{{Hostname}} gpu {{gpu}}")),
            panel("Power", "watt", q(f"DCGM_FI_DEV_POWER_USAGE{{{G}}}", "{{Hostname}} gpu {{gpu}}"),
                  q(f"rate(DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{{{G}}}[{RATE}]) / 1000", "from energy {{gpu}}")),
            panel("Clock event reasons (bitmask)", "none",
                  q(f"DCGM_FI_DEV_CLOCKS_EVENT_REASONS{{{G}}}", "{{Hostname}} gpu {{gpu}}"),
                  description="GPUThrottled pages for bits 0x4 0x8 0x20 0x40 0x80 held 1m."),
        ]),
        ("Errors", [
            panel("Last XID", "none", q(f"DCGM_FI_DEV_XID_ERRORS{{{G}}}", "{{Hostname}} gpu {{gpu}}"), kind="stat"),
            panel("Double-bit ECC errors (volatile)", "none",
                  q(f"DCGM_FI_DEV_ECC_DBE_VOL_TOTAL{{{G}}}", "{{Hostname}} gpu {{gpu}}"), kind="stat"),
            panel("Pages retired for DBE", "none",
                  q(f"DCGM_FI_DEV_RETIRED_DBE{{{G}}}", "{{Hostname}} gpu {{gpu}}"), kind="stat"),
        ]),
    ],
)

K = 'model_name=~"$model_name", instance=~"$instance"'
KV = dashboard(
    "soberana-kv-warehouse", "Soberana / KV warehouse",
    "Tiers below the GPU pool: host RAM, disk, Redis, shared directory.",
    [variable("model_name", "label_values(soberana:kv_lookups_total, model_name)", "Model"),
     variable("instance", "label_values(soberana:kv_lookups_total, instance)", "Instance")],
    [
        ("Effect", [
            panel("Warehouse prefix hit rate (tokens)", "percentunit",
                  q(f"sum(rate(vllm:external_prefix_cache_hits_total{{{K}}}[{RATE}])) / sum(rate(vllm:external_prefix_cache_queries_total{{{K}}}[{RATE}]))", "hit rate")),
            panel("Prefill tokens saved", "short",
                  q(f"sum(rate(soberana:kv_prefill_tokens_saved_total{{{K}}}[{RATE}]))", "tokens/s")),
            panel("Prefix load latency", "s", *quantiles("soberana:kv_load_latency_seconds", K, by="instance")),
        ]),
        ("Tiers", [
            panel("Tier reads: hits and misses", "short",
                  q(f"sum by (tier) (rate(soberana:kv_hits_total{{{K}}}[{RATE}]))", "hits {{tier}}"),
                  q(f"sum by (tier) (rate(soberana:kv_misses_total{{{K}}}[{RATE}]))", "misses {{tier}}")),
            panel("Tier fill", "percentunit",
                  q(f"sum by (tier) (soberana:kv_tier_used_bytes{{{K}}}) / sum by (tier) (soberana:kv_tier_capacity_bytes{{{K}}})", "{{tier}}")),
            panel("Tier I/O", "Bps",
                  q(f"sum by (tier) (rate(soberana:kv_read_bytes_total{{{K}}}[{RATE}]))", "read {{tier}}"),
                  q(f"sum by (tier) (rate(soberana:kv_written_bytes_total{{{K}}}[{RATE}]))", "written {{tier}}")),
            panel("Tier failures", "short",
                  q(f"sum by (tier) (rate(soberana:kv_errors_total{{{K}}}[{RATE}]))", "errors {{tier}}"),
                  q(f"sum by (tier) (rate(soberana:kv_rejected_entries_total{{{K}}}[{RATE}]))", "rejected {{tier}}"),
                  description="KVWarehouseTierFailing warns on errors held 5m."),
            panel("Writes dropped (buffer full)", "short",
                  q(f"sum(rate(soberana:kv_puts_dropped_total{{{K}}}[{RATE}]))", "dropped/s"),
                  q(f"sum(rate(soberana:kv_puts_total{{{K}}}[{RATE}]))", "accepted/s")),
            panel("Tiers loaded from", "none", q(f"soberana:kv_tier_loading{{{K}}}", "{{tier}}"),
                  description="1: blocks are loaded from the tier; 0: calibration found recomputing faster."),
        ]),
    ],
)

B = 'model=~"$model", instance=~"$instance"'
GATEWAY = dashboard(
    "soberana-gateway", "Soberana / Gateway and tenants",
    "Routing, backends and tenants of `soberana gateway`.",
    [variable("model", "label_values(soberana_gateway_backend_info, model)", "Model"),
     variable("instance", "label_values(soberana_gateway_backend_info, instance)", "Gateway")],
    [
        ("Traffic", [
            panel("Responses by status", "reqps",
                  q(f"sum by (code) (rate(soberana_gateway_responses_total{{{B}}}[{RATE}]))", "{{code}}")),
            panel("Upstream attempts by backend", "reqps",
                  q(f"sum by (backend) (rate(soberana_gateway_requests_total{{{B}}}[{RATE}]))", "{{backend}}")),
            panel("Upstream errors by reason", "reqps",
                  q(f"sum by (backend, reason) (rate(soberana_gateway_errors_total{{{B}}}[{RATE}]))", "{{backend}} {{reason}}")),
        ]),
        ("Latency", [
            panel("Upstream time to first byte", "s", *quantiles("soberana_gateway_upstream_first_byte_seconds", B, by="backend")),
            panel("Upstream total time", "s", *quantiles("soberana_gateway_upstream_total_seconds", B, by="backend")),
            panel("Gateway overhead", "s", *quantiles("soberana_gateway_added_latency_seconds", B, by="model")),
        ]),
        ("Backends", [
            panel("Healthy / ejected", "none",
                  q(f"soberana_gateway_backend_healthy{{{B}}}", "healthy {{backend}}"),
                  q(f"soberana_gateway_backend_ejected{{{B}}}", "ejected {{backend}}"),
                  description="GatewayBackendEjected warns; GatewayNoBackend pages."),
            panel("Outstanding and queued", "none",
                  q(f"soberana_gateway_backend_outstanding_requests{{{B}}}", "in flight {{backend}}"),
                  q(f"soberana_gateway_backend_num_requests_waiting{{{B}}}", "waiting {{backend}}")),
            panel("Backend KV cache usage", "percentunit",
                  q(f"soberana_gateway_backend_kv_cache_usage_perc{{{B}}}", "{{backend}}")),
        ]),
        ("Tenants", [
            panel("Requests by tenant", "reqps",
                  q(f"sum by (tenant) (rate(soberana_gateway_tenant_requests_total{{{B}}}[{RATE}]))", "{{tenant}}")),
            panel("Tokens by tenant", "short",
                  q(f"sum by (tenant, type) (rate(soberana_gateway_tenant_tokens_total{{{B}}}[{RATE}]))", "{{tenant}} {{type}}")),
            panel("Refused requests by tenant and reason", "reqps",
                  q(f"sum by (tenant, reason) (rate(soberana_gateway_rejections_total{{instance=~\"$instance\"}}[{RATE}]))", "{{tenant}} {{reason}}")),
        ]),
    ],
)

DASHBOARDS = {"soberana-engine.json": ENGINE, "soberana-gpu.json": GPU,
              "soberana-kv-warehouse.json": KV, "soberana-gateway.json": GATEWAY}

if __name__ == "__main__":
    for name, doc in DASHBOARDS.items():
        (HERE / name).write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {HERE / name}")
