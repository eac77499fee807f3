"""Every query of every Grafana dashboard returns series from a real Prometheus that scraped a
real `soberana serve`, the gateway and the GPU exporter (over a replayed NVML)."""

from __future__ import annotations

import importlib.util
import json
import re
import time
from pathlib import Path

import pytest

from tests.deploy.stack import BROKEN_MODEL, LIMITED_KEY

GRAFANA = Path(__file__).resolve().parents[2] / "deploy" / "grafana"
# What Grafana would substitute: every variable at "All" and a rate window of 20 scrapes.
SUBSTITUTIONS = {"$__rate_interval": "20s", "$model_name": ".*", "$instance": ".*",
                 "$Hostname": ".*", "$gpu": ".*", "$model": ".*"}


def dashboards() -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted(GRAFANA.glob("*.json"))}


def queries(doc: dict) -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in doc["panels"] for t in p.get("targets", [])]


def expand(expr: str) -> str:
    for name, value in sorted(SUBSTITUTIONS.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(name, value)
    assert "$" not in expr, f"unknown variable in {expr}"
    return expr


def test_checked_in_dashboards_are_what_the_generator_writes():
    spec = importlib.util.spec_from_file_location("build_dashboards", GRAFANA / "build_dashboards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert set(module.DASHBOARDS) == set(dashboards())
    for name, doc in module.DASHBOARDS.items():
        assert json.loads(json.dumps(doc)) == dashboards()[name], f"run build_dashboards.py ({name})"


def test_the_four_dashboards_exist_with_unique_panel_ids():
    docs = dashboards()
    assert {d["uid"] for d in docs.values()} == {
        "soberana-engine", "soberana-gpu", "soberana-kv-warehouse", "soberana-gateway"}
    for doc in docs.values():
        ids = [p["id"] for p in doc["panels"]]
        assert len(ids) == len(set(ids))


@pytest.fixture(scope="module")
def traffic(stack):
    """Traffic that gives every panel something to show: requests (streamed and not, a
    repeated prompt for prefix hits), a tenant over its rate limit, a backend that fails."""
    for i in range(3):
        assert stack.chat("The same long prompt, so the prefix cache has something to hit",
                          max_tokens=6).status_code == 200
        assert stack.chat(f"stream {i}", stream=True, max_tokens=6).status_code == 200
    assert stack.chat("first", key=LIMITED_KEY).status_code == 200
    assert stack.chat("second", key=LIMITED_KEY).status_code == 429
    for _ in range(3):
        assert stack.chat("to the broken backend", model=BROKEN_MODEL).status_code >= 500
    stack.wait_for('soberana_gateway_errors_total{reason="http_5xx"}')
    stack.wait_for("soberana_gateway_rejections_total")
    stack.wait_for("vllm:e2e_request_latency_seconds_count > 5")
    time.sleep(3)  # a few more scrapes, so every rate() has two samples in its window
    return stack


@pytest.mark.parametrize("name", sorted(p.name for p in GRAFANA.glob("*.json")))
def test_every_panel_query_returns_series(traffic, name):
    doc = dashboards()[name]
    empty = []
    for title, expr in queries(doc):
        if not traffic.query(expand(expr)):
            empty.append(f"{title}: {expr}")
    assert empty == [], "panels without data:\n" + "\n".join(empty)
    for var in doc["templating"]["list"]:
        if var["type"] != "query":
            continue
        metric, label = re.fullmatch(r"label_values\((.+), (\w+)\)", var["query"]["query"]).groups()
        values = traffic.query(f"count by ({label}) ({expand(metric)})")
        assert values, f"variable {var['name']} has no values"
