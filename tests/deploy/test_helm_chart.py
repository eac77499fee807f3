"""The Helm chart: Helm's own lint and rendering (Helm's Go SDK through helm-python-sdk; no
helm binary installs from the registries CI reaches), Kubernetes schema validation of every
core resource (kubernetes-validate) and of the ServiceMonitor and PrometheusRule against the
prometheus-operator CRD schemas (tests/deploy/crd_schema.py), the PrometheusRule through
promtool, and the gateway config through the real gateway's --check."""

from __future__ import annotations

import copy
import importlib.util
import shutil
import subprocess
import sys

import pytest
import yaml

from tests.deploy.crd_schema import crd_problems
from tests.deploy.gateway_check import assert_valid_but_for_unresolvable_hosts
from tests.gateway.helpers import REPO

helm = pytest.importorskip("helm_python", reason="helm-python-sdk not installed (pip install helm-python-sdk)")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

CHART = REPO / "deploy" / "helm" / "soberana"
CI_VALUES = yaml.safe_load((CHART / "ci" / "test-values.yaml").read_text())
K8S_VERSION = "1.31.0"


@pytest.fixture(scope="module")
def rendered() -> dict[tuple[str, str], dict]:
    with helm.Chart.load(str(CHART)) as chart:
        manifests = chart.render(CI_VALUES, name="prod", namespace="llm")
    docs = {}
    for path, text in manifests.items():
        if path.endswith(".txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                docs[(doc["kind"], doc["metadata"]["name"])] = doc
    return docs


def test_helm_lint_finds_no_errors():
    result = helm.lint(str(CHART), CI_VALUES, strict=True, kube_version=K8S_VERSION)
    assert result["errors"] == []
    assert [m for m in result["messages"] if m["severity"] > 1] == []  # INFO only (no icon)


def test_every_core_resource_passes_kubernetes_schema_validation(rendered):
    core = [d for d in rendered.values() if d["apiVersion"] != "monitoring.coreos.com/v1"]
    assert {d["kind"] for d in core} == {
        "Deployment", "Service", "ConfigMap", "HorizontalPodAutoscaler"}
    for doc in core:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.skipif(
    importlib.util.find_spec("cloudcoil") is None,
    reason="cloudcoil-models-prometheus-operator not installed (in the dev extra)",
)
def test_service_monitor_and_prometheus_rule_pass_the_crd_schemas(rendered):
    monitoring = [d for d in rendered.values() if d["apiVersion"] == "monitoring.coreos.com/v1"]
    assert sorted(d["kind"] for d in monitoring) == ["PrometheusRule", "ServiceMonitor"]
    for doc in monitoring:
        assert crd_problems(doc) == [], doc["kind"]
    # The check is real: a misspelt field, a value outside an enum and a wrong type are refused.
    monitor = copy.deepcopy(rendered[("ServiceMonitor", "prod-soberana")])
    monitor["spec"]["endpoints"][0]["intervl"] = "15s"
    assert crd_problems(monitor) == ["spec.endpoints[0].intervl: unknown field"]
    monitor["spec"]["endpoints"][0]["scheme"] = "gopher"
    assert any("scheme" in p and "'http'" in p for p in crd_problems(monitor))
    rule = copy.deepcopy(rendered[("PrometheusRule", "prod-soberana")])
    rule["spec"]["groups"][0]["rules"][0]["for"] = 300
    assert any(p.startswith("spec.groups.0.rules.0.for") for p in crd_problems(rule))


def test_engine_gets_a_gpu_and_probes_health(rendered):
    pod = rendered[("Deployment", "prod-soberana-engine")]["spec"]["template"]["spec"]
    (engine,) = pod["containers"]
    assert engine["resources"]["limits"]["nvidia.com/gpu"] == 1
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert engine[probe]["httpGet"]["path"] == "/health"
    # Model loading gets its 20 minutes before liveness may restart the pod.
    assert engine["startupProbe"]["periodSeconds"] * engine["startupProbe"]["failureThreshold"] == 1200
    assert "--kv-redis-url=redis://prod-soberana-redis:6379/0" in engine["args"]
    assert engine["env"][0]["valueFrom"]["secretKeyRef"]["name"] == "soberana-engine-key"


def test_gateway_config_is_accepted_by_the_real_gateway(rendered, tmp_path):
    config = rendered[("ConfigMap", "prod-soberana-gateway")]["data"]["gateway.yaml"]
    (tmp_path / "gateway.yaml").write_text(config)
    out = subprocess.run([sys.executable, "-m", "soberana.cli", "gateway", "--check", "--config",
                          str(tmp_path / "gateway.yaml")], capture_output=True, text=True, cwd=REPO,
                         timeout=120)
    assert_valid_but_for_unresolvable_hosts(out)
    backend = yaml.safe_load(config)["models"]["llama-3.1-8b"]["backends"][0]
    assert backend["endpoint"] == "http://prod-soberana-engine:8000"
    gateway = rendered[("Deployment", "prod-soberana-gateway")]["spec"]["template"]["spec"]
    assert gateway["containers"][0]["readinessProbe"]["httpGet"]["path"] == "/health"


def test_hpa_scales_the_engine_on_waiting_requests(rendered):
    hpa = rendered[("HorizontalPodAutoscaler", "prod-soberana-engine")]["spec"]
    assert hpa["scaleTargetRef"]["name"] == "prod-soberana-engine"
    assert hpa["metrics"][0]["pods"]["metric"]["name"] == "vllm_num_requests_waiting"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_prometheus_rule_carries_the_tested_alerts_and_the_slo(rendered, tmp_path):
    rule = rendered[("PrometheusRule", "prod-soberana")]
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    out = subprocess.run(["promtool", "check", "rules", str(tmp_path / "rules.yaml")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    static = yaml.safe_load((REPO / "deploy" / "prometheus" / "alerts.yaml").read_text())
    assert rule["spec"]["groups"][:-1] == static["groups"]
    assert rule["spec"]["groups"][-1]["rules"][0]["expr"] == "vector(2)"
    monitor = rendered[("ServiceMonitor", "prod-soberana")]
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"


def test_chart_copy_of_the_alerts_is_the_tested_file():
    assert (CHART / "files" / "alerts.yaml").read_text() == (
        REPO / "deploy" / "prometheus" / "alerts.yaml").read_text()


def test_rendering_without_tenants_fails_with_a_clear_message():
    with helm.Chart.load(str(CHART)) as chart, pytest.raises(helm.HelmRenderError, match="gateway.tenants"):
        chart.render({}, name="prod", namespace="llm")


def test_bad_values_are_refused_by_the_schema():
    with helm.Chart.load(str(CHART)) as chart, pytest.raises(helm.HelmError, match="gpuMemoryUtilization"):
        chart.render({**CI_VALUES, "engine": {**CI_VALUES["engine"], "gpuMemoryUtilization": 1.5}},
                     name="prod", namespace="llm")
