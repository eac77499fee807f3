"""SIGHUP reloads the config in place: new catalog and tenants, no dropped requests."""

from __future__ import annotations

import threading

import httpx

from tests.gateway.helpers import backend, config, tenant, wait_until

ACME, GLOBEX = "sk-acme", "sk-globex"


def stream_in_background(gw, key: str) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def run() -> None:
        body = {
            "model": "m",
            "stream": True,
            "messages": [{"role": "user", "content": "long answer"}],
        }
        with httpx.stream(
            "POST",
            gw.url + "/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
        ) as r:
            result["status"] = r.status_code
            result["text"] = r.read().decode()

    thread = threading.Thread(target=run)
    thread.start()
    return thread, result


def test_sighup_adds_models_and_tenants_in_the_running_process(upstreams, start_gateway):
    a, b = upstreams("a"), upstreams("b")
    doc = config({"m": [backend("a", a)]}, [tenant("acme", ACME)])
    gw = start_gateway(doc)
    assert gw.chat(GLOBEX, model="n").status_code == 401

    gw.write_config(
        config(
            {"m": [backend("a", a)], "n": [backend("b", b)]},
            [tenant("acme", ACME), tenant("globex", GLOBEX)],
        )
    )
    gw.reload()
    wait_until(
        lambda: gw.chat(GLOBEX, model="n").status_code == 200, what="reloaded tenant and model"
    )
    assert gw.proc.poll() is None
    assert b.received[-1].body["model"] == "upstream-b"
    assert "reloaded" in gw.log()


def test_requests_in_flight_during_a_reload_finish(upstreams, start_gateway):
    old = upstreams("old", stream_chunks=10, chunk_delay_s=0.3)
    new = upstreams("new")
    gw = start_gateway(config({"m": [backend("old", old)]}, [tenant("acme", ACME)]))
    thread, result = stream_in_background(gw, ACME)
    wait_until(lambda: old.in_flight == 1, what="the stream to start")

    # The new config drops the backend that is serving the stream.
    gw.write_config(config({"m": [backend("new", new)]}, [tenant("acme", ACME)]))
    gw.reload()
    wait_until(
        lambda: gw.chat(ACME, content="after").headers.get("X-Gateway-Backend") == "new",
        what="the switch",
    )
    assert thread.is_alive()  # the reload happened while the stream was still running
    thread.join(30)
    assert result["status"] == 200
    assert result["text"].count("old-") == 10 and result["text"].endswith("data: [DONE]\n\n")


def test_an_invalid_config_on_reload_keeps_the_running_one(upstreams, start_gateway):
    a = upstreams("a")
    gw = start_gateway(config({"m": [backend("a", a)]}, [tenant("acme", ACME)]))
    gw.config_path.write_text(gw.config_path.read_text().replace("kind: vllm", "kind: tgi"))
    gw.reload()
    wait_until(lambda: "reload failed" in gw.log(), what="the reload error in the log")
    assert "backends[0].kind: 'tgi' is not one of" in gw.log()
    assert gw.chat(ACME).status_code == 200
    assert gw.proc.poll() is None


def test_rate_limit_state_survives_a_reload(upstreams, start_gateway):
    a = upstreams("a")
    doc = config({"m": [backend("a", a)]}, [tenant("acme", ACME, requests_per_minute=2)])
    gw = start_gateway(doc)
    assert [gw.chat(ACME).status_code for _ in range(3)] == [200, 200, 429]
    doc["models"]["m"]["backends"][0]["weight"] = 2.0  # an unrelated change
    gw.write_config(doc)
    gw.reload()
    wait_until(lambda: "reloaded" in gw.log(), what="the reload")
    assert gw.chat(ACME).status_code == 429  # a reload is no way around the limit
