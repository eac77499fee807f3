"""Detection and redaction in process: the labelled corpus, and every place a value can hide."""

from __future__ import annotations

import asyncio
import json
from collections import Counter

from soberana.gateway.privacy.detector import Detector
from soberana.gateway.privacy.recognizers import CHECKSUM_TYPES, custom_recognizer
from soberana.gateway.privacy.redactor import redact_body
from tests.gateway.privacy.corpus import generate


def score(detector: Detector, messages) -> dict[str, dict[str, float]]:
    """Precision and recall per entity type; a detected near-miss counts as a false positive."""
    tp, fn, fp = Counter(), Counter(), Counter()
    for m in messages:
        found = {(s.entity_type, m.text[s.start : s.end]) for s in detector.detect(m.text, None)}
        for label in m.labels:
            (tp if label in found else fn)[label[0]] += 1
        for f in found - set(m.labels):
            fp[f[0]] += 1
    return {
        kind: {
            "support": tp[kind] + fn[kind],
            "precision": tp[kind] / max(1, tp[kind] + fp[kind]),
            "recall": tp[kind] / max(1, tp[kind] + fn[kind]),
        }
        for kind in sorted(set(tp) | set(fn) | set(fp))
    }


def test_corpus_recall_is_complete_for_checksum_types_and_no_near_miss_is_redacted():
    messages = generate(600)
    assert len(messages) >= 500
    assert sum(len(m.near_misses) for m in messages) >= 150
    report = score(Detector([]), messages)
    print("\n" + json.dumps(report, indent=1))
    for kind in CHECKSUM_TYPES:
        assert report[kind]["support"] >= 50
        assert report[kind]["recall"] == 1.0, (kind, report[kind])
    for kind, r in report.items():
        assert r["precision"] == 1.0, (kind, r)  # near-misses (wrong check digit) stay
        assert r["recall"] >= 0.99, (kind, r)


def test_a_wrong_check_digit_is_not_redacted():
    text = (
        "IBAN ES91 2100 0418 4502 0005 1333, card 4111 1111 1111 1112, DNI 12345678A, "
        "NIE X1234567A, CIF B12345675"
    )
    assert Detector([]).detect(text, None) == []


def redact(body: dict, detector: Detector | None = None) -> tuple[dict, object]:
    return asyncio.run(redact_body(body, detector or Detector([]), None, 5.0))


def test_same_value_gets_the_same_placeholder_across_messages_and_parts():
    iban = "ES91 2100 0418 4502 0005 1332"
    body = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "Cliente con cuenta " + iban},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": f"¿Saldo de {iban}? Escribe a ana@example.com"}
                ],
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {
                            "name": "saldo",
                            "arguments": json.dumps({"iban": iban, "phone": 612345678}),
                        },
                    }
                ],
            },
            {
                "role": "tool",
                "tool_call_id": "call_1",
                "content": f"saldo de {iban}: 10 EUR; aviso a ana@example.com",
            },
        ],
    }
    out, redaction = redact(body)
    text = json.dumps(out, ensure_ascii=False)
    assert iban not in text and "ana@example.com" not in text and "612345678" not in text
    assert text.count("<IBAN_CODE_1>") == 4 and "<IBAN_CODE_2>" not in text
    assert text.count("<EMAIL_ADDRESS_1>") == 2
    args = json.loads(out["messages"][2]["tool_calls"][0]["function"]["arguments"])
    assert args == {"iban": "<IBAN_CODE_1>", "phone": "<PHONE_NUMBER_1>"}  # still valid JSON
    assert out["messages"][3]["tool_call_id"] == "call_1"  # structure untouched
    assert redaction.counts == {"IBAN_CODE": 1, "EMAIL_ADDRESS": 1, "PHONE_NUMBER": 1}


def test_messages_api_blocks_and_system_are_redacted():
    body = {
        "model": "m",
        "system": [{"type": "text", "text": "DNI del cliente: 12345678Z"}],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Mi NIE es X1234567L"}]},
            {
                "role": "assistant",
                "content": [
                    {"type": "tool_use", "id": "tu_1", "name": "f", "input": {"nie": "X1234567L"}}
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "tu_1",
                        "content": [{"type": "text", "text": "NSS 28 12345678 40"}],
                    }
                ],
            },
        ],
    }
    out, _ = redact(body)
    text = json.dumps(out)
    for value in ("12345678Z", "X1234567L", "28 12345678 40"):
        assert value not in text
    assert out["messages"][1]["content"][0]["input"] == {"nie": "<ES_NIE_1>"}


def test_custom_recognizer_from_config_redacts_with_its_validator():
    detector = Detector([custom_recognizer("EMPLOYEE_ID", r"EMP-(?P<value>\d{6})", "luhn")])
    out, _ = redact(
        {"messages": [{"role": "user", "content": "EMP-123455 and EMP-123456"}]}, detector
    )
    # 123455 passes Luhn, 123456 does not
    assert out["messages"][0]["content"] == "EMP-<EMPLOYEE_ID_1> and EMP-123456"


def test_inline_detection_fails_closed_on_deadline_and_on_errors():
    import pytest

    from soberana.gateway.privacy.detector import DetectorError
    from soberana.gateway.privacy.recognizers import Recognizer

    detector = Detector([])
    assert detector.inline
    texts = ["IBAN ES91 2100 0418 4502 0005 1332 " * 50]
    with pytest.raises(DetectorError, match="longer than"):
        asyncio.run(detector.detect_async(texts, None, 1e-9))

    def broken(value: str) -> bool:
        raise RuntimeError("validator bug")

    r = detector.recognizers[0]
    detector.recognizers[0] = Recognizer(r.entity_type, r.pattern, broken, r.priority)
    with pytest.raises(DetectorError, match="RuntimeError"):
        asyncio.run(detector.detect_async(texts, None, 5.0))
