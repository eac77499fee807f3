"""The privacy keys of gateway.yaml: defaults, the stricter-of-two rule, errors that locate."""

from __future__ import annotations

import pytest
import yaml

from soberana.gateway.config_loader import ConfigError, parse_config
from soberana.gateway.privacy.config import PiiPolicy
from tests.gateway.helpers import config, tenant


def doc(**tenant_fields) -> dict:
    b = {
        "name": "c",
        "endpoint": "http://127.0.0.1:1",
        "kind": "openai",
        "model": "x",
        "privacy": "external",
    }
    return config({"m": [b]}, [tenant("a", "k", **tenant_fields)])


def test_pii_policy_parses_and_bad_values_name_the_key_and_line():
    cfg = parse_config(yaml.safe_dump(doc(pii={"action": "block", "entities": ["IBAN_CODE"]})))
    assert cfg.tenants[0].pii == PiiPolicy(action="block", entities=("IBAN_CODE",))
    with pytest.raises(ConfigError, match=r"tenants\[0\]\.pii\.action: 'mask' is not one of"):
        parse_config(yaml.safe_dump(doc(pii={"action": "mask"})))
    with pytest.raises(ConfigError, match=r"pii\.entities\[0\]: unknown entity type 'iban'"):
        parse_config(yaml.safe_dump(doc(pii={"entities": ["iban"]})))
    with pytest.raises(ConfigError, match=r"guardrails\.input: 'deny' is not one of"):
        parse_config(yaml.safe_dump(doc(guardrails={"input": "deny"})))


def test_the_stricter_of_tenant_and_route_policy_applies():
    tenant_policy = PiiPolicy(
        action="redact", entities=("EMAIL_ADDRESS",), on_detector_error="onprem"
    )
    route = PiiPolicy(action="block", entities=("IBAN_CODE",), when="always")
    merged = tenant_policy.stricter(route)
    assert merged == PiiPolicy("block", ("EMAIL_ADDRESS", "IBAN_CODE"), "always", "block")
    assert PiiPolicy(action="off").stricter(None) == PiiPolicy(action="off")
