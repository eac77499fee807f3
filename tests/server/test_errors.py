"""Every bad request gets the right status and an OpenAI-shaped error naming the problem."""

from __future__ import annotations

import httpx
import openai
import pytest

CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
COMPLETION = {"prompt": "Hi", "max_tokens": 2}


def assert_error(resp: httpx.Response, status: int, param: str | None = None) -> dict:
    """The response is `status` with {"error": {"message", "type", "param", "code"}}."""
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param
        assert param.split(".")[0] in error["message"]
    return error


def test_invalid_json_is_a_400(server):
    resp = server.post(
        "/v1/chat/completions", content=b'{"messages": [', headers={"Content-Type": "application/json"}
    )
    error = assert_error(resp, 400)
    assert "JSON" in error["message"]


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"prompt": "Hi", "max_tokens": "16"}, "max_tokens"),
        ("/v1/completions", {"prompt": "Hi", "max_tokens": 16.0}, "max_tokens"),
        ("/v1/completions", {"prompt": "Hi", "n": True}, "n"),
        ("/v1/completions", {"prompt": "Hi", "stream": "yes"}, "stream"),
        ("/v1/completions", {"prompt": 42}, "prompt"),
        ("/v1/completions", {"prompt": [1, "a"]}, "prompt"),
        ("/v1/completions", {"max_tokens": 2}, "prompt"),
        ("/v1/chat/completions", {"messages": "Hi"}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ("/v1/chat/completions", {**CHAT, "temperature": "0.5"}, "temperature"),
        ("/v1/chat/completions", {**CHAT, "stop": [1]}, "stop"),
        ("/v1/chat/completions", {**CHAT, "logprobs": 1}, "logprobs"),
    ],
)
def test_wrong_types_are_rejected_not_coerced(server, path, body, param):
    assert_error(server.post(path, json=body), 400, param)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -5}, "max_tokens"),
        ({"max_tokens": 10**30}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"n": 10_000}, "n"),
        ({"temperature": -1}, "temperature"),
        ({"temperature": 1e9}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 2}, "min_p"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"logprobs": 21}, "logprobs"),
        ({"logprobs": -1}, "logprobs"),
        ({"seed": 2**64}, "seed"),
        ({"stop": ""}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids.0"),
        ({"stop_token_ids": [10**6]}, "stop_token_ids"),
        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
        ({"prompt": [10**6]}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"cache_salt": ""}, "cache_salt"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
    ],
)
def test_out_of_range_values_are_rejected(server, body, param):
    assert_error(server.post("/v1/completions", json={**COMPLETION, **body}), 400, param)


def test_nan_and_infinity_are_rejected(server):
    for raw in (b'{"prompt": "Hi", "temperature": NaN}', b'{"prompt": "Hi", "top_p": Infinity}'):
        resp = server.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"})
        assert_error(resp, 400)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"function_call": "auto"}, "function_call"),
        ({"reasoning_effort": "low"}, "reasoning_effort"),
        ({"logit_bias": {"1": 5}}, "logit_bias"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
         "messages.0.content.0.type"),
    ],
)
def test_unsupported_parameters_get_a_400_naming_them(server, extra, param):
    error = assert_error(server.post("/v1/chat/completions", json={**CHAT, **extra}), 400, param)
    assert "not supported" in error["message"]


def test_tool_choice_auto_needs_a_tool_call_parser(server):
    # The demo model's template has no call syntax, and this server names no parser.
    tools = [{"type": "function", "function": {"name": "f"}}]
    error = assert_error(server.post("/v1/chat/completions", json={**CHAT, "tools": tools}), 400,
                         "tool_choice")
    assert "--tool-call-parser" in error["message"]
    error = assert_error(server.post("/v1/chat/completions", json={**CHAT, "tool_choice": "required"}),
                         400, "tool_choice")


def test_neutral_values_of_unsupported_parameters_are_accepted(server):
    body = {**CHAT, "tools": None, "response_format": {"type": "text"}, "logit_bias": {}}
    assert server.post("/v1/chat/completions", json=body).status_code == 200


def test_unknown_parameter_is_named(server):
    error = assert_error(server.post("/v1/completions", json={**COMPLETION, "tempreature": 0}), 400)
    assert error["param"] == "tempreature"
    assert "tempreature" in error["message"]


def test_unknown_model_is_a_404(server, client):
    error = assert_error(server.post("/v1/completions", json={**COMPLETION, "model": "gpt-9"}), 404)
    assert error["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-9", prompt="Hi", max_tokens=1)


def test_too_long_prompt_names_both_lengths(server, client, model):
    prompt = "word " * 300  # over the 256-token context
    count = server.post("/tokenize", json={"prompt": prompt}).json()["count"]
    error = assert_error(server.post("/v1/completions", json={"prompt": prompt, "max_tokens": 10}), 400)
    assert error["code"] == "context_length_exceeded"
    assert "256" in error["message"] and str(count) in error["message"]
    # Prompt fits but prompt + max_tokens does not: both numbers appear.
    fits = server.post("/tokenize", json={"messages": CHAT["messages"]}).json()["count"]
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=model, messages=CHAT["messages"], max_tokens=256)
    assert str(fits) in exc.value.message and "256" in exc.value.message


def test_missing_or_wrong_api_key_is_a_401(server):
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}, {"Authorization": "test-key"}):
        error = assert_error(server.post("/v1/completions", json=COMPLETION, headers=headers), 401)
        assert error["code"] == "invalid_api_key"
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    # Probes and scrapers need no key.
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/metrics").status_code == 200


def test_unknown_route_and_wrong_method(server):
    assert_error(server.get("/v1/nothing-here"), 404)
    assert_error(server.get("/v1/chat/completions"), 405)


def test_bad_tokenize_and_detokenize_bodies(server):
    assert_error(server.post("/tokenize", json={}), 400, "prompt")
    assert_error(server.post("/tokenize", json={"prompt": "a", "messages": CHAT["messages"]}), 400)
    assert_error(server.post("/detokenize", json={"tokens": [10**6]}), 400, "tokens")
    assert_error(server.post("/detokenize", json={"tokens": ["1"]}), 400, "tokens.0")


def test_server_still_serves_after_bad_requests(server, client, model):
    for _ in range(3):
        server.post("/v1/completions", content=b"\x00\xff", headers={"Content-Type": "application/json"})
    resp = client.completions.create(model=model, prompt="Hi", max_tokens=2)
    assert resp.choices[0].text is not None
