"""The Dockerfile and docker-compose.yaml, checked without a Docker daemon (CI has none):
the slim image installs what the gateway, bench and telemetry import, with torch absent;
compose wires the services together with configs the real tools accept."""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
import sys
import tomllib

import pytest
import yaml

from tests.deploy.gateway_check import assert_valid_but_for_unresolvable_hosts
from tests.gateway.helpers import REPO

_PROBE = """
import importlib.abc, json, sys
class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {"torch", "triton", "safetensors"}:
            raise ImportError("not in the slim image: " + name)
sys.meta_path.insert(0, NoTorch())
before = set(sys.modules)
import soberana.cli, soberana.gateway.cli, soberana.gateway.server, soberana.bench.cli
import soberana.bench.runner, soberana.bench.report, soberana.bench.plots, soberana.bench.compare
import soberana.bench.tokens, soberana.telemetry.cli
new = {m.split(".")[0] for m in set(sys.modules) - before}
print(json.dumps(sorted(m for m in new if m not in sys.stdlib_module_names and not m.startswith("_"))))
"""


def slim_pip_list() -> set[str]:
    """The distributions the slim image's `pip install "/src[EXTRAS]" PKG...` names: the
    package's base dependencies, those of the extras, and the packages listed beside them."""
    text = (REPO / "Dockerfile").read_text()
    stage = text.split("AS gateway", 1)[1]
    match = re.search(r'pip install "/src\[([^\]]+)\]" ([^&]+)&&', stage)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in match.group(1).split(","):
        requirements += project["optional-dependencies"][extra]
    names = {re.split(r"[ ;<>=!~\[(]", r, maxsplit=1)[0] for r in requirements}
    return names | set(match.group(2).replace("\\", " ").split())


def _closure(names: set[str]) -> set[str]:
    """The listed distributions and everything they require, as installed here."""
    seen, todo = set(), [canonical(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for req in requires:
            if "extra ==" in req:
                continue
            todo.append(canonical(re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0]))
    return seen


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_slim_image_covers_what_gateway_bench_and_telemetry_import_without_torch():
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr  # no torch import on these paths
    imported = set(yaml.safe_load(out.stdout)) - {"soberana", "cython_runtime"}
    installed = slim_pip_list()
    assert "torch" not in installed
    available = _closure(installed)
    owners = importlib.metadata.packages_distributions()
    missing = {m: owners.get(m) for m in imported
               if not any(canonical(d) in available for d in owners.get(m, [m]))}
    assert missing == {}, "modules the slim image would lack (module: distributions)"


def test_engine_image_serves_on_8000_with_a_health_check():
    text = (REPO / "Dockerfile").read_text()
    engine = text.split("AS engine", 1)[1].split("AS gateway", 1)[0]
    assert "/health" in engine and "EXPOSE 8000" in engine and "USER soberana" in engine


def test_compose_wires_engine_gateway_redis_prometheus():
    doc = yaml.safe_load((REPO / "docker-compose.yaml").read_text())
    services = doc["services"]
    assert set(services) == {"engine", "gateway", "redis", "prometheus"}
    engine = services["engine"]
    assert "--kv-redis-url=redis://redis:6379/0" in engine["command"]
    assert engine["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert services["gateway"]["depends_on"]["engine"]["condition"] == "service_healthy"
    for name, service in services.items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} published beyond this host: {port}"


def test_compose_gateway_config_passes_the_gateway_check():
    out = subprocess.run([sys.executable, "-m", "soberana.cli", "gateway", "--check", "--config",
                          str(REPO / "deploy" / "compose" / "gateway.yaml")],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert_valid_but_for_unresolvable_hosts(out)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_compose_prometheus_config_is_valid(tmp_path):
    # The rule paths are the container's: point them at the repository's files to check.
    config = (REPO / "deploy" / "compose" / "prometheus.yml").read_text().replace(
        "/etc/prometheus/soberana", str(REPO / "deploy" / "prometheus"))
    (tmp_path / "prometheus.yml").write_text(config)
    out = subprocess.run(["promtool", "check", "config", str(tmp_path / "prometheus.yml")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
