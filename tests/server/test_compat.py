"""What clients and operators expect around the API: model lookup, CORS, HEAD probes, a /docs
page that needs no CDN, an OpenAPI document that matches the answers, a helpful CLI."""

from __future__ import annotations

import argparse
import json
import re

import httpx
import jsonschema
import pytest

from soberana.cli import main
from soberana.server.cli import add_arguments
from tests.server.helpers import ALLOWED_ORIGIN, API_KEY


def test_openai_client_retrieves_a_model_by_id(client, model):
    card = client.models.retrieve(model)
    assert card.id == model and card.object == "model"


def test_retrieving_an_unknown_model_is_a_404(server):
    r = server.get("/v1/models/not-served")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_head_health_answers_without_a_body(server):
    r = httpx.head(f"{server.url}/health", timeout=30)
    assert r.status_code == 200 and r.content == b""


def test_the_bearer_scheme_is_case_insensitive(server):
    for scheme in ("bearer", "BEARER"):
        r = httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"{scheme} {API_KEY}"})
        assert r.status_code == 200, scheme


def test_cors_preflight_is_answered_for_allowed_origins_only(server):
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    r = httpx.options(f"{server.url}/v1/chat/completions",
                      headers={"Origin": ALLOWED_ORIGIN, **preflight})
    assert r.status_code == 200
    assert r.headers["Access-Control-Allow-Origin"] == ALLOWED_ORIGIN
    assert "authorization" in r.headers["Access-Control-Allow-Headers"].lower()
    r = server.get("/v1/models", headers={"Origin": ALLOWED_ORIGIN})
    assert r.headers["Access-Control-Allow-Origin"] == ALLOWED_ORIGIN
    r = httpx.options(f"{server.url}/v1/chat/completions",
                      headers={"Origin": "https://evil.example", **preflight})
    assert "Access-Control-Allow-Origin" not in r.headers


def test_docs_load_swagger_ui_from_this_server_only(server):
    page = httpx.get(f"{server.url}/docs", timeout=30)
    assert page.status_code == 200
    urls = re.findall(r"""(?:src|href)=["']([^"']+)""", page.text)
    assert urls and all(u.startswith("/docs/assets/") for u in urls)
    assert "http://" not in page.text and "https://" not in page.text
    for url in urls:
        assert httpx.get(f"{server.url}{url}", timeout=30).status_code == 200


@pytest.fixture(scope="module")
def openapi(server) -> dict:
    return httpx.get(f"{server.url}/openapi.json", timeout=30).json()


def _validate(openapi: dict, schema_name: str, instance: object) -> None:
    document = {"$ref": f"#/components/schemas/{schema_name}", "components": openapi["components"]}
    jsonschema.validate(instance, document, cls=jsonschema.Draft202012Validator)


def test_openapi_documents_400_errors_not_422(openapi):
    for path, item in openapi["paths"].items():
        for method, operation in item.items():
            assert "422" not in operation["responses"], (method, path)
    errors = openapi["paths"]["/v1/chat/completions"]["post"]["responses"]["400"]
    assert errors["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    metrics = openapi["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain"]


def test_openapi_response_schemas_match_the_answers(server, openapi):
    def ok(path: str) -> str:
        operation = openapi["paths"][path]["get" if path == "/v1/models" else "post"]
        return operation["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]

    chat = server.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "logprobs": True,
        "top_logprobs": 2})
    completion = server.post("/v1/completions", json={
        "prompt": "Hi", "max_tokens": 3, "logprobs": 2, "echo": True})
    answers = {
        "/v1/chat/completions": chat,
        "/v1/completions": completion,
        "/tokenize": server.post("/tokenize", json={"prompt": "Hi"}),
        "/detokenize": server.post("/detokenize", json={"tokens": [1, 2]}),
        "/v1/models": server.get("/v1/models"),
    }
    for path, answer in answers.items():
        assert answer.status_code == 200, answer.text
        _validate(openapi, ok(path).rsplit("/", 1)[1], answer.json())
    assert ok("/v1/chat/completions").endswith("/ChatCompletion")
    bad = server.post("/v1/completions", json={"prompt": "Hi", "max_tokens": "3"})
    assert bad.status_code == 400
    _validate(openapi, "ErrorResponse", bad.json())


def test_streamed_chunks_match_the_documented_chunk_schema(server, openapi):
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body,
                      headers=server.headers, timeout=60) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    for event in events[:-1]:
        _validate(openapi, "ChatCompletionChunk", json.loads(event))


def test_help_shows_defaults_and_every_flag_has_help(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = capsys.readouterr().out
    assert "(default: 1024)" in text  # --max-waiting-requests
    assert "(default: 16)" in text  # --block-size
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    for action in parser._actions:
        assert action.help and action.help.strip(), f"{action.option_strings} has no help text"


def test_an_unsupported_device_fails_while_parsing(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--device", "xpu"])
    assert exc.value.code == 2
    assert "unsupported device 'xpu': choose auto, cpu, cuda or cuda:N" in capsys.readouterr().err


def test_start_up_logs_each_phase_and_loads_the_tokenizer_with_the_engine(server):
    log = server.log()
    phases = [r"engine core process started", r"engine core: libraries imported in \d",
              r"tokenizer loaded in \d+\.\ds \(while the engine loads\)",
              r"engine core ready in \d", r"soberana.server: ready: serving .* start-up took \d"]
    positions = [re.search(p, log) for p in phases]
    assert all(positions), [p for p, found in zip(phases, positions) if not found]
    # The tokenizer loads beside the engine, not after it: both are done before "ready".
    assert positions[0].start() < positions[2].start() < positions[4].start()
    assert positions[3].start() < positions[4].start()


def test_models_show_the_compute_backend_chosen_at_start(server):
    """/v1/models names what serves the ops (chosen once, ops/backend.py), and the start-up log
    has the same choice on one line."""
    card = server.get("/v1/models").json()["data"][0]
    compute = card["compute"]
    assert compute["requested"] == "auto"
    assert compute["compute_backend"] in ("native", "torch")  # torch: no C compiler here
    assert compute["kernels"] and isinstance(compute["fallbacks"], list)
    assert f"Compute backend: {compute['compute_backend']} (" in server.log()
