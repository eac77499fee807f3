"""gateway.yaml is validated at start: every error names the bad key and its line."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from soberana.gateway.config_loader import ConfigError, load_config, parse_config
from soberana.gateway.tenants import hash_key

REPO = Path(__file__).resolve().parents[2]
DIGEST = hash_key("sk-test")

VALID = f"""\
models:
  chat-small:
    backends:
      - name: a
        endpoint: http://127.0.0.1:9001/v1
        kind: soberana
        model: tiny
        capabilities: [chat, completions]
        region: eu
        max_concurrency: 4
        context_window: 2048
        privacy: onprem
tenants:
  - name: acme
    key_sha256: [{DIGEST}]
    models: [chat-small]
    privacy: [onprem]
"""


def error_for(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(textwrap.dedent(text), source="gateway.yaml")
    return info.value


def test_valid_config_builds_catalog_and_tenants():
    cfg = parse_config(VALID)
    backend = cfg.models["chat-small"].backends[0]
    assert backend.endpoint == "http://127.0.0.1:9001"  # the /v1 suffix is normalised away
    assert backend.capabilities == ("chat", "completions")
    assert (
        backend.max_concurrency == 4 and backend.pool == "primary" and backend.privacy == "onprem"
    )
    assert cfg.tenants[0].key_sha256 == (DIGEST,)


def test_misspelled_backend_key_is_named_with_its_line():
    err = error_for(VALID.replace("        region: eu\n", "        regoin: eu\n"))
    assert err.line == 9
    assert "models.chat-small.backends[0].regoin" in str(err)
    assert "unknown key" in str(err) and "gateway.yaml:9" in str(err)


def test_unknown_backend_kind_lists_the_allowed_kinds():
    err = error_for(VALID.replace("kind: soberana", "kind: tgi"))
    assert err.line == 6
    assert "backends[0].kind" in str(err) and "'tgi' is not one of soberana, vllm" in str(err)


def test_unknown_capability_is_rejected_at_its_list_item():
    err = error_for(VALID.replace("[chat, completions]", "[chat, vision]"))
    assert err.line == 8 and "capabilities[1]" in str(err) and "'vision'" in str(err)


def test_wrong_type_names_the_key():
    err = error_for(VALID.replace("max_concurrency: 4", "max_concurrency: lots"))
    assert (
        err.line == 10
        and "max_concurrency" in str(err)
        and "expected an integer, got 'lots'" in str(err)
    )


def test_zero_concurrency_is_rejected():
    err = error_for(VALID.replace("max_concurrency: 4", "max_concurrency: 0"))
    assert "max_concurrency: must be > 0" in str(err)


def test_missing_endpoint_names_the_backend_line():
    err = error_for(VALID.replace("        endpoint: http://127.0.0.1:9001/v1\n", ""))
    assert err.line == 4 and "missing required key 'endpoint'" in str(err)


def test_endpoint_must_be_an_http_url():
    err = error_for(VALID.replace("http://127.0.0.1:9001/v1", "127.0.0.1:9001"))
    assert err.line == 5 and "endpoint" in str(err) and "http(s)://" in str(err)


def test_tenant_key_must_be_a_sha256_digest_not_a_plain_key():
    err = error_for(VALID.replace(DIGEST, "sk-plaintext-key"))
    assert err.line == 15 and "tenants[0].key_sha256[0]" in str(err) and "sha256" in str(err)


def test_tenant_may_only_list_models_in_the_catalog():
    err = error_for(VALID.replace("models: [chat-small]", "models: [chat-large]"))
    assert (
        err.line == 16
        and "tenants[0].models[0]" in str(err)
        and "unknown model 'chat-large'" in str(err)
    )


def test_unknown_privacy_class_is_rejected():
    err = error_for(VALID.replace("privacy: [onprem]", "privacy: [onprem, public]"))
    assert "tenants[0].privacy[1]" in str(err) and "'public'" in str(err)


def test_unknown_top_level_section_is_rejected():
    err = error_for(VALID + "routin:\n  max_attempts: 2\n")
    assert err.line == 18 and "routin: unknown key" in str(err)


def test_routing_values_are_checked():
    err = error_for(VALID + "routing:\n  affinity_load_factor: 0.5\n")
    assert err.line == 19 and "routing.affinity_load_factor" in str(err)


def test_api_key_env_must_be_set(monkeypatch):
    monkeypatch.delenv("SOBERANA_TEST_MISSING_KEY", raising=False)
    text = VALID.replace(
        "        region: eu\n",
        "        region: eu\n        api_key_env: SOBERANA_TEST_MISSING_KEY\n",
    )
    err = error_for(text)
    assert err.line == 10 and "SOBERANA_TEST_MISSING_KEY is not set" in str(err)
    monkeypatch.setenv("SOBERANA_TEST_MISSING_KEY", "secret")
    assert (
        parse_config(text).models["chat-small"].backends[0].api_key_env
        == "SOBERANA_TEST_MISSING_KEY"
    )


def test_duplicate_backend_names_are_rejected():
    text = VALID.replace(
        "tenants:",
        "      - {name: a, endpoint: 'http://127.0.0.1:9002', kind: vllm, model: tiny, "
        "privacy: onprem}\ntenants:",
    )
    err = error_for(text)
    assert err.line == 13 and "backend name 'a' is already used" in str(err)


def test_the_same_key_for_two_tenants_is_rejected():
    text = VALID + f"  - name: other\n    key_sha256: [{DIGEST}]\n"
    err = error_for(text)
    assert err.line == 18 and "also used by tenant 'acme'" in str(err)


def test_broken_yaml_reports_its_line():
    err = error_for(VALID.replace("    key_sha256: [", "    key_sha256: [[", 1))
    assert "invalid YAML" in str(err) and "gateway.yaml:" in str(err)


def test_the_shipped_example_is_valid(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-example")
    cfg = load_config(REPO / "examples/gateway.yaml")
    assert {"llama-3.1-8b", "guard-1b", "embed-small"} <= set(cfg.models)
    pools = {b.pool for b in cfg.models["llama-3.1-8b"].backends}
    assert pools == {"primary", "overflow"}
    result = run_cli("--config", str(REPO / "examples/gateway.yaml"), "--check")
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "soberana.cli", "gateway", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


def test_gateway_refuses_to_start_on_an_invalid_config(tmp_path):
    path = tmp_path / "gateway.yaml"
    path.write_text(VALID.replace("kind: soberana", "kind: tgi"))
    result = run_cli("--config", str(path), "--port", "0")
    assert result.returncode == 2
    assert f"{path}:6: models.chat-small.backends[0].kind" in result.stderr


def test_check_flag_validates_without_serving(tmp_path):
    path = tmp_path / "gateway.yaml"
    path.write_text(VALID)
    result = run_cli("--config", str(path), "--check")
    assert result.returncode == 0 and "OK (1 models, 1 backends, 1 tenants)" in result.stdout


def test_a_backend_must_declare_its_privacy_class():
    # A cloud API without `privacy:` used to default to onprem and receive onprem-only prompts.
    text = VALID.replace("        privacy: onprem\n", "").replace(
        "http://127.0.0.1:9001/v1", "https://api.openai.com/v1"
    )
    err = error_for(text)
    assert err.line == 4 and "models.chat-small.backends[0]" in str(err)
    assert "missing required key 'privacy'" in str(err) and "external" in str(err)


def test_the_default_backend_name_does_not_reveal_its_address():
    cfg = parse_config(VALID.replace("      - name: a\n        endpoint", "      - endpoint"))
    assert cfg.models["chat-small"].backends[0].name == "backend-0"


@pytest.mark.parametrize(
    "endpoint, shown",
    [("http://8.8.8.8:8000", "is a public address"), ("https://api.openai.com/v1", "")],
)
def test_check_flags_an_onprem_backend_on_a_public_address(tmp_path, endpoint, shown):
    path = tmp_path / "gateway.yaml"
    path.write_text(VALID.replace("http://127.0.0.1:9001/v1", endpoint))
    result = run_cli("--config", str(path), "--check")
    assert result.returncode == 1, result.stdout + result.stderr
    warning = result.stderr
    assert "models.chat-small.backends[0] (a): declared privacy onprem" in warning
    assert shown in warning and "privacy: external" in warning
    assert "1 privacy warning(s)" in result.stdout


def test_check_accepts_private_and_loopback_onprem_endpoints(tmp_path):
    path = tmp_path / "gateway.yaml"
    private = VALID.replace("http://127.0.0.1:9001/v1", "http://10.1.2.3:8000")
    for text in (VALID, private, VALID.replace("127.0.0.1", "localhost")):
        path.write_text(text)
        result = run_cli("--config", str(path), "--check")
        assert result.returncode == 0 and "OK" in result.stdout, result.stderr


def test_metrics_keys_are_stored_hashed():
    err = error_for(VALID + "metrics:\n  api_key_sha256: [sk-plain]\n")
    assert "metrics.api_key_sha256[0]" in str(err) and "sha256" in str(err)
    cfg = parse_config(VALID + f"metrics:\n  api_key_sha256: [{DIGEST}]\n  tenant_labels: true\n")
    assert cfg.metrics.api_key_sha256 == (DIGEST,) and cfg.metrics.tenant_labels


def test_hash_key_prints_the_digest_to_store():
    result = run_cli("--hash-key", stdin="sk-test\n")
    assert result.returncode == 0 and result.stdout.strip() == DIGEST


def test_no_gateway_module_imports_torch():
    code = (
        "import importlib, pkgutil, sys, soberana.gateway as g\n"
        "for m in pkgutil.iter_modules(g.__path__):\n"
        "    importlib.import_module('soberana.gateway.' + m.name)\n"
        "import soberana.cli\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print(len(list(pkgutil.iter_modules(g.__path__))))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) >= 15  # every module was imported
