"""Hostile bodies: broken Unicode, huge bodies and prompts get a prompt 4xx, never a 500."""

from __future__ import annotations

import json
import socket
from urllib.parse import urlparse

import pytest

from tests.server.helpers import API_KEY

LONE = "\ud800"  # half of a surrogate pair: what a JavaScript client sends when it cuts an emoji
CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
SURROGATE_BODIES = [
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": f"Hi {LONE}"}]},
     "messages.0.content"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "Hi",
                                                    "name": LONE}]}, "messages.0.name"),
    ("/v1/chat/completions", {**CHAT, "model": f"soberana{LONE}"}, "model"),
    ("/v1/chat/completions", {**CHAT, "stream": True, "stop": [LONE]}, "stop.0"),
    ("/v1/completions", {"prompt": f"{LONE}Hi", "max_tokens": 2}, "prompt"),
    ("/v1/completions", {"prompt": ["ok", "\udc00"], "max_tokens": 2}, "prompt.1"),
    ("/tokenize", {"prompt": f"a{LONE}b"}, "prompt"),
    ("/tokenize", {"messages": [{"role": "user", "content": LONE}]}, "messages.0.content"),
    ("/detokenize", {"tokens": [1, 2], "model": LONE}, "model"),
]


@pytest.mark.parametrize(("path", "body", "param"), SURROGATE_BODIES)
def test_lone_surrogates_get_a_400_naming_the_parameter(server, path, body, param):
    log_before = len(server.log())
    # json.dumps escapes the surrogate as \ud800, exactly what such a client sends.
    r = server.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_unicode" and error["param"] == param
    assert "Traceback" not in server.log()[log_before:]


def test_a_valid_surrogate_pair_is_an_ordinary_character(server):
    r = server.post("/tokenize", content=json.dumps({"prompt": "\U0001f600 ok"}),
                    headers={"Content-Type": "application/json"})
    assert r.status_code == 200 and r.json()["count"] > 0


def _raw(server, head: str) -> socket.socket:
    url = urlparse(server.url)
    sock = socket.create_connection((url.hostname, url.port), timeout=60)
    sock.sendall(
        (f"POST /v1/completions HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/json"
         f"\r\nAuthorization: Bearer {API_KEY}\r\n{head}\r\n").encode()
    )
    return sock


def _response(sock: socket.socket) -> tuple[int, dict]:
    data = b""
    while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_a_body_past_the_limit_is_refused_before_it_is_sent(server):
    # The server answers from the declared length alone: not one body byte is sent.
    sock = _raw(server, f"Content-Length: {64 * 2**20}\r\n")
    try:
        status, body = _response(sock)
    finally:
        sock.close()
    assert status == 413
    assert body["error"]["code"] == "request_too_large"


def test_a_chunked_body_past_the_limit_is_refused_once_it_passes(server):
    sock = _raw(server, "Transfer-Encoding: chunked\r\n")
    chunk = b"x" * 2**20
    try:
        try:
            for _ in range(40):  # 40 MiB against the default limit of 32
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed: the rest was never read
        status, body = _response(sock)
    finally:
        sock.close()
    assert status == 413
    assert body["error"]["code"] == "request_too_large"


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_prompt_too_long_for_any_tokenization_is_refused_before_tokenizing(server, path):
    text = "hello " * 800_000  # 4.8 MB: took 13.6 s to refuse after tokenizing (issue 17)
    body = ({"prompt": text} if path == "/v1/completions"
            else {"messages": [{"role": "user", "content": text}]})
    r = server.post(path, json={**body, "max_tokens": 1})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert "4800000 characters" in error["message"]  # counted, not tokenized
