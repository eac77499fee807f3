"""The privacy layer in front of a real `soberana serve` (the on-prem pool) and the recording
stand-in cloud: personal data reaches the engine on site as written, and the cloud only as
placeholders."""

from __future__ import annotations

import httpx
import pytest

from tests.gateway.helpers import backend, config, tenant
from tests.gateway.privacy.conftest import KEY_A, LENIENT_HEALTH
from tests.server.helpers import ServerProcess

IBAN = "ES91 2100 0418 4502 0005 1332"
EMAIL = "lucia.garcia@example.com"
TEXT = f"Transfer the rent from {IBAN} and write to {EMAIL} when it is done."


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    proc = ServerProcess(tmp_path_factory.mktemp("onprem") / "serve.log", api_key=None)
    try:
        yield proc.start()
    finally:
        proc.stop()


def test_onprem_engine_gets_the_original_and_the_cloud_only_placeholders(
    engine, cloud, start_gateway
):
    c = cloud()
    doc = config(
        {
            "local": [backend("engine", engine.url, kind="soberana", model="soberana-demo")],
            "burst": [backend("cloud", c.url, kind="openai", privacy="external")],
        },
        [tenant("a", KEY_A, privacy=["onprem", "external"])],  # default pii: redact when external
        health=LENIENT_HEALTH,
        timeouts={"first_byte_s": 120.0, "idle_s": 120.0},
    )
    gw = start_gateway(doc)
    # On site: the real engine reads the prompt as written (when: external redacts nothing here),
    # so it counts exactly the original's tokens.
    local = gw.chat(KEY_A, model="local", content=TEXT, max_tokens=4, temperature=0)
    assert local.status_code == 200, local.text
    rendered = httpx.post(
        f"{engine.url}/tokenize", json={"messages": [{"role": "user", "content": TEXT}]}, timeout=30
    ).json()
    assert local.json()["usage"]["prompt_tokens"] == rendered["count"]
    assert gw.metric("soberana_gateway_pii_redactions_total") == 0
    # Leaving the site: the cloud sees placeholders only; the answer comes back with originals.
    burst = gw.chat(KEY_A, model="burst", content=TEXT)
    assert burst.status_code == 200, burst.text
    sent = b"".join(c.raw_bodies)
    assert IBAN.encode() not in sent and EMAIL.encode() not in sent
    assert b"<IBAN" in sent and b"<EMAIL" in sent
    answer = burst.json()["choices"][0]["message"]["content"]
    assert IBAN in answer and EMAIL in answer
    assert gw.metric("soberana_gateway_pii_redactions_total") >= 2


def test_anthropic_messages_through_the_gateway_to_a_real_engine(engine, start_gateway):
    import anthropic

    doc = config(
        {"local": [backend("engine", engine.url, kind="soberana", model="soberana-demo")]},
        [tenant("a", KEY_A, privacy=["onprem"])],
        health=LENIENT_HEALTH,
        timeouts={"first_byte_s": 120.0, "idle_s": 120.0},
    )
    gw = start_gateway(doc)
    client = anthropic.Anthropic(base_url=gw.url, api_key=KEY_A, max_retries=0)
    message = client.messages.create(
        model="local", max_tokens=4, messages=[{"role": "user", "content": "Hello"}]
    )
    assert message.role == "assistant" and message.usage.output_tokens >= 1
    with client.messages.stream(
        model="local", max_tokens=4, messages=[{"role": "user", "content": "Hello"}]
    ) as stream:
        final = stream.get_final_message()
    assert final.stop_reason in ("end_turn", "max_tokens")
    # The gateway adds its tenant's cache_salt to every body; the Messages endpoint used to
    # refuse it (400), so Anthropic clients could not go through the gateway.
    assert gw.metric("soberana_gateway_errors_total") == 0
