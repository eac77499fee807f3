"""The alert rules in deploy/prometheus/ pass promtool's checks and unit tests, and every
alert has a test where it fires and one where it stays quiet."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
PAGES = {"GPUMemoryHigh", "GPUThrottled", "GPUXidError", "GPUEccDoubleBitError", "KVCacheFull",
         "TTFTP95OverSLO"}

promtool = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    promtool is None, reason="promtool not installed (Debian: apt-get install prometheus)"
)


def alerts() -> dict[str, dict]:
    doc = yaml.safe_load((RULES / "alerts.yaml").read_text())
    return {r["alert"]: r for g in doc["groups"] for r in g["rules"] if "alert" in r}


@needs_promtool
def test_rule_files_are_valid():
    out = subprocess.run([promtool, "check", "rules", "alerts.yaml", "slo.yaml"], cwd=RULES,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


@needs_promtool
def test_promtool_unit_tests_pass():
    tests = sorted(p.name for p in (RULES / "tests").glob("*.yaml"))
    out = subprocess.run([promtool, "test", "rules", *tests], cwd=RULES / "tests",
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("SUCCESS") == len(tests)


def test_every_alert_is_tested_firing_and_not_firing():
    fired, quiet = set(), set()
    for path in (RULES / "tests").glob("*.yaml"):
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = set(alerts())
    assert names - fired == set(), "alerts never tested firing"
    assert names - quiet == set(), "alerts never tested staying quiet"


def test_the_six_paging_alerts_page():
    rules = alerts()
    assert PAGES <= set(rules)
    assert {name for name, r in rules.items() if r["labels"]["severity"] == "page"} >= PAGES
    assert rules["GPUMemoryHigh"]["for"] == "2m" and rules["GPUThrottled"]["for"] == "1m"
    assert rules["KVCacheFull"]["for"] == "3m" and rules["TTFTP95OverSLO"]["for"] == "5m"
