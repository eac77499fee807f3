"""Names in tools and streams, and NER that fails: the leaks LiteLLM's Presidio hook has
(tool-call arguments, placeholders split across SSE chunks, fail open), checked for the names,
places and organisations that only NER or a field's name can find."""

from __future__ import annotations

import asyncio
import json
import os

import httpx
import pytest

from soberana.gateway.privacy.detector import Detector, DetectorError
from soberana.gateway.privacy.field_hints import hinted_type
from soberana.gateway.privacy.redactor import redact_body
from tests.gateway.helpers import tenant
from tests.gateway.privacy.conftest import KEY_A, cloud_config
from tests.gateway.privacy.test_privacy_gateway import read_audit, stream_with_first_byte
from tests.gateway.privacy.test_privacy_ner import EN, ES, needs_pipelines
from tests.gateway.privacy.test_privacy_rehydration import anthropic_text, openai_text

spacy = pytest.importorskip("spacy")
faulty_ner = pytest.importorskip("tests.gateway.privacy.faulty_ner")

IBAN = "ES91 2100 0418 4502 0005 1332"
# Bare values the small NER pipelines miss on their own (measured): only the field's name
# says they are a person, a place, an organisation.
CARMEN, LUGO, ACME, PEDRO = "Carmen", "Lugo", "Acme", "Pedro"


def openai_tool_history(prose: str) -> list[dict]:
    return [
        {"role": "user", "content": prose},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "arguments": json.dumps(
                            {"customer_name": CARMEN, "ciudad": LUGO, "empresa": ACME, "iban": IBAN}
                        ),
                    },
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": json.dumps({"contact": PEDRO})},
    ]


def anthropic_tool_history(prose: str) -> list[dict]:
    return [
        {"role": "user", "content": [{"type": "text", "text": prose}]},
        {
            "role": "assistant",
            "content": [
                {
                    "type": "tool_use",
                    "id": "tu_1",
                    "name": "get_weather",
                    "input": {"firstName": CARMEN, "city": LUGO, "company": ACME, "iban": IBAN},
                }
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "tu_1",
                    "content": json.dumps({"contacto": PEDRO}),
                }
            ],
        },
    ]


def test_field_names_that_name_a_person_place_or_organisation():
    assert hinted_type("customer_name") == hinted_type("firstName") == "PERSON"
    assert hinted_type("First Name") == hinted_type("apellidos") == "PERSON"
    assert hinted_type("ciudad") == hinted_type("dirección") == "LOCATION"
    assert hinted_type("razon_social") == hinted_type("company") == "ORGANIZATION"
    assert hinted_type("note") is hinted_type("arguments") is hinted_type(None) is None


def test_named_fields_in_tool_calls_and_results_are_redacted_whole_and_tool_names_kept():
    # No NER pipeline at all: the field names alone protect the bare values.
    for body in (
        {"model": "m", "messages": openai_tool_history("hola")},
        {"model": "m", "max_tokens": 9, "messages": anthropic_tool_history("hola")},
    ):
        out, redaction = asyncio.run(redact_body(body, Detector([]), None, 5.0))
        text = json.dumps(out, ensure_ascii=False)
        for value in (CARMEN, LUGO, ACME, PEDRO, IBAN):
            assert value not in text
        assert redaction.by_placeholder == {
            "<PERSON_1>": CARMEN,
            "<LOCATION_1>": LUGO,
            "<ORGANIZATION_1>": ACME,
            "<IBAN_CODE_1>": IBAN,
            "<PERSON_2>": PEDRO,
        }
        assert text.count('"get_weather"') == 1  # the called tool keeps its declared name
    calls = out["messages"][1]["content"][0]
    assert calls["input"] == {
        "firstName": "<PERSON_1>",
        "city": "<LOCATION_1>",
        "company": "<ORGANIZATION_1>",
        "iban": "<IBAN_CODE_1>",
    }
    # A tool result given as JSON text stays JSON text.
    assert json.loads(out["messages"][2]["content"][0]["content"]) == {"contacto": "<PERSON_2>"}


def test_field_hints_follow_the_policy_entities_and_ner_off():
    body = {"model": "m", "messages": openai_tool_history("hola")}
    _, only_ibans = asyncio.run(redact_body(body, Detector([]), frozenset({"IBAN_CODE"}), 5.0))
    assert only_ibans.by_placeholder == {"<IBAN_CODE_1>": IBAN}
    _, ner_off = asyncio.run(redact_body(body, Detector([]), None, 5.0, ner="off"))
    assert ner_off.by_placeholder == {"<IBAN_CODE_1>": IBAN}


@needs_pipelines
def test_ner_keeps_tool_names_that_it_would_read_as_names():
    detector = Detector([], (ES, EN))
    # Measured: en_core_web_sm tags a bare `get_weather` as a PERSON.
    assert [s.entity_type for s in detector.detect("get_weather", None)] == ["PERSON"]
    body = {"model": "m", "messages": openai_tool_history("hola")}
    out, _ = asyncio.run(redact_body(body, detector, None, 30.0))
    assert out["messages"][1]["tool_calls"][0]["function"]["name"] == "get_weather"


PROSE = (
    "Hola, soy Lucía Fernández, de Banco Santander, y vivo en Sevilla. "
    "My colleague Emily Johnson from London will call."
)
NAMES = ["Lucía Fernández", "Banco Santander", "Sevilla", "Emily Johnson", "London"]


@needs_pipelines
def test_names_in_prose_and_tools_stream_back_whole_and_never_reach_the_cloud(
    cloud, start_gateway, tmp_path
):
    # One-character deltas: every placeholder (<PERSON_1>, <ORGANIZATION_1>, ...) is split at
    # every position across SSE events, in the text, the tool-call arguments and the
    # /v1/messages input_json deltas.
    c = cloud(piece_chars=1, piece_delay_s=0.002)
    audit = tmp_path / "audit.log"
    privacy = {"ner_models": [ES, EN], "detector_timeout_s": 60}
    gw = start_gateway(cloud_config(c, privacy=privacy, audit={"path": str(audit)}))
    every = [*NAMES, CARMEN, LUGO, ACME, PEDRO, IBAN]
    bodies = {
        "/v1/chat/completions": {"model": "m", "messages": openai_tool_history(PROSE)},
        "/v1/messages": {"model": "m", "max_tokens": 50, "messages": anthropic_tool_history(PROSE)},
    }
    for path, body in bodies.items():
        data, first = stream_with_first_byte(gw.url, KEY_A, path, {**body, "stream": True})
        assert first < c.behaviour.finished_at[-1]  # streamed, not held to the end
        text, args = (anthropic_text if path == "/v1/messages" else openai_text)(data)
        values = json.loads(args)["values"]
        for value in every:
            assert value in text, (path, value)
            assert any(value in v for v in values), (path, value)
        assert "<PERSON_" not in text + args and "<ORGANIZATION_" not in text + args
    sent = c.received_text()
    assert [v for v in every if v in sent] == []
    assert sent.count('"get_weather"') == 2  # the called tool's name went out as it is
    # Nowhere the gateway writes: its audit file, its log, its metrics.
    records = read_audit(audit, 2)
    metrics_text = httpx.get(gw.url + "/metrics").text
    for where in (audit.read_text(), gw.log(), metrics_text):
        assert [v for v in every if v in where] == []
    assert all(r["pii"]["entities"]["PERSON"] >= 3 for r in records)
    # Both scans (NER included) were timed: the detector-latency histogram counts them.
    assert gw.metric("soberana_gateway_pii_detector_latency_seconds_count") == 2
    assert gw.metric("soberana_gateway_pii_detector_latency_seconds_sum") > 0


@pytest.fixture
def faulty_pipeline(tmp_path, monkeypatch):
    """The path of a pipeline whose `ner` fails or stalls, loadable by a gateway process."""
    site = faulty_ner.install_entry_point(tmp_path / "site")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    return str(faulty_ner.save_pipeline(tmp_path / "faulty"))


def test_ner_failure_or_timeout_in_a_gateway_sends_nothing_out(
    cloud, start_gateway, faulty_pipeline
):
    c = cloud()
    gw = start_gateway(
        cloud_config(
            c,
            [tenant("a", KEY_A, privacy=["onprem", "external"], pii={"ner": "required"})],
            privacy={"ner_models": [faulty_pipeline], "detector_timeout_s": 1.0},
        )
    )
    assert c.raw_bodies == []
    ok = gw.chat(KEY_A, content=f"Carmen, IBAN {IBAN}")
    assert ok.status_code == 200, ok.text  # the pipeline loaded and passes ordinary text
    for trigger, reason in (
        (faulty_ner.FAIL, "detector_error"),
        (faulty_ner.STALL, "detector_timeout"),
    ):
        r = gw.chat(KEY_A, content=f"{trigger} Carmen, IBAN {IBAN}")
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "pii_detector_unavailable"
        assert gw.metric("soberana_gateway_privacy_blocks_total", reason=reason) == 1
    assert len(c.raw_bodies) == 1 and IBAN not in c.received_text()
    # A Messages request with the name only in a tool_use block fails closed the same way.
    body = {"model": "m", "max_tokens": 9, "messages": anthropic_tool_history(faulty_ner.FAIL)}
    r = gw.post("/v1/messages", KEY_A, body)
    assert r.status_code == 503 and len(c.raw_bodies) == 1


def test_a_failing_ner_pipeline_fails_detection_in_process(faulty_pipeline):
    detector = Detector([], (faulty_pipeline,))
    with pytest.raises(DetectorError, match="RuntimeError"):
        asyncio.run(detector.detect_async([faulty_ner.FAIL], None, 5.0))
    with pytest.raises(DetectorError, match="longer than"):
        asyncio.run(detector.detect_async([faulty_ner.STALL], None, 0.2))
