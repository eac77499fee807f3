"""Every refused request leaves exactly one audit record (status, error code, no key, no PII):
failed authentication on any endpoint, a privacy-class refusal, an unknown path or method,
and a client that leaves in the middle of its stream."""

from __future__ import annotations

import json

import httpx

from soberana.gateway.tenants import hash_key
from tests.gateway.helpers import tenant, wait_until
from tests.gateway.privacy.conftest import KEY_A, KEY_B, cloud_config
from tests.gateway.privacy.test_privacy_gateway import IBAN, verify

WRONG_KEY = "sk-wrong-key-never-logged"


def test_refused_requests_are_audited_once_without_keys_or_values(cloud, start_gateway, tmp_path):
    c = cloud(answer_override="streamed slowly " * 20, piece_chars=1, piece_delay_s=0.02)
    audit = tmp_path / "audit.log"
    tenants = [
        tenant("a", KEY_A, privacy=["onprem", "external"]),
        tenant("b", KEY_B, privacy=["onprem"]),  # may not use the external-only model
    ]
    metrics = {"tenant_labels": True, "api_key_sha256": [hash_key("sk-metrics")]}
    gw = start_gateway(cloud_config(c, tenants, audit={"path": str(audit)}, metrics=metrics))
    chat = {"model": "m", "messages": [{"role": "user", "content": f"IBAN {IBAN}"}]}
    cases = {  # request id -> (method, path, key, body, expected status)
        "no-key": ("POST", "/v1/chat/completions", None, chat, 401),
        "wrong-key": ("POST", "/v1/chat/completions", WRONG_KEY, chat, 401),
        "models-wrong-key": ("GET", "/v1/models", WRONG_KEY, None, 401),
        "metrics-tenant-key": ("GET", "/metrics", KEY_A, None, 401),
        "privacy-class": ("POST", "/v1/chat/completions", KEY_B, chat, 403),
        "unknown-path": ("POST", "/v1/nothing-here", KEY_A, chat, 404),
        "wrong-method": ("GET", "/v1/chat/completions", KEY_A, None, 405),
        "served": ("POST", "/v1/chat/completions", KEY_A, chat, 200),
        "models-ok": ("GET", "/v1/models", KEY_A, None, 200),  # not a refusal: no record
    }
    for request_id, (method, path, key, body, status) in cases.items():
        headers = {"X-Request-Id": request_id}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        r = httpx.request(method, gw.url + path, json=body, headers=headers, timeout=30)
        assert r.status_code == status, (request_id, r.text)
    # A client that leaves in the middle of a streamed answer.
    stream_body = {**chat, "stream": True}  # 320 one-character pieces, 20 ms apart
    headers = {"X-Request-Id": "client-left", "Authorization": f"Bearer {KEY_A}"}
    with httpx.stream(
        "POST", gw.url + "/v1/chat/completions", json=stream_body, headers=headers, timeout=30
    ) as r:
        next(r.iter_raw())

    expected = {rid: case[4] for rid, case in cases.items() if rid != "models-ok"}
    expected["client-left"] = 499

    def records() -> dict[str, list[dict]]:
        by_id: dict[str, list[dict]] = {}
        for line in audit.read_text().splitlines() if audit.exists() else []:
            record = json.loads(line)
            by_id.setdefault(record["request_id"], []).append(record)
        return by_id

    wait_until(lambda: set(records()) >= set(expected), what="every audit record", timeout=30)
    found = records()
    assert set(found) == set(expected)  # the 200 on /v1/models is not recorded
    for request_id, status in expected.items():
        assert [r["status"] for r in found[request_id]] == [status], request_id
    assert found["wrong-key"][0]["error"] == "invalid_api_key"
    assert found["wrong-key"][0]["tenant"] is None
    assert found["models-wrong-key"][0]["path"] == "/v1/models"
    assert found["privacy-class"][0]["tenant"] == "b"
    assert found["privacy-class"][0]["error"] == "privacy_class_not_allowed"
    assert found["unknown-path"][0]["error"] == "not_found"
    assert found["client-left"][0]["error"] == "client_closed_request"
    text = audit.read_text()
    for secret in (WRONG_KEY, KEY_A, KEY_B, "sk-metrics", IBAN):
        assert secret not in text
    assert verify(audit).returncode == 0  # the refusals are links of the same chain
