"""A fast OpenAI-compatible streaming endpoint with fault injection.

It generates no text worth reading: it answers `max_tokens` tokens as fast as asked, so that
`soberana bench` itself can be measured (its overhead) and tested (its error handling)
against a real HTTP server on loopback. Run it with
`python -m soberana.bench.fake_endpoint --port 8000 --faults ok,http500,drop`.

Faults are applied in turn, one per completion request, cycling through `--faults`:

| fault         | what the client sees                                                     |
|---------------|--------------------------------------------------------------------------|
| `ok`          | a normal stream, with usage and [DONE]                                   |
| `no_usage`    | a normal stream without the usage chunk                                  |
| `http500`     | HTTP 500 with an OpenAI-shaped error body (also `http429`, `http503`...) |
| `disconnect`  | the connection closes before any response                                |
| `drop`        | the connection closes in the middle of the stream                        |
| `malformed`   | a `data:` line that is not JSON                                          |
| `error_event` | an `{"error": ...}` object inside the stream                             |
| `truncated`   | the stream ends cleanly without finish_reason or [DONE]                  |
| `stall`       | no response at all (the client's timeout fires)                          |
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from soberana.openai_error import error_body

FAULTS = ("ok", "no_usage", "disconnect", "drop", "malformed", "error_event", "truncated", "stall")
_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
_STALL_S = 3600.0
_KV_SLOTS = 64  # requests in flight that make `vllm:kv_cache_usage_perc` read 1.0


def check_faults(names: list[str]) -> list[str]:
    """Validate fault names (see the module docstring); `httpNNN` is any status code."""
    for name in names:
        if name not in FAULTS and not (name.startswith("http") and name[4:].isdigit()):
            raise ValueError(f"unknown fault {name!r}; known: {', '.join(FAULTS)}, httpNNN")
    return names


@dataclass
class FakeEndpointConfig:
    """How the endpoint answers."""

    model: str = "fake-model"
    faults: list[str] = field(default_factory=lambda: ["ok"])
    ttft_s: float = 0.0  # delay before the first token; reported as queue time (x-queue-time)
    itl_s: float = 0.0  # delay between tokens
    api_key: str | None = None  # when set, /v1 routes answer 401 without `Bearer <api_key>`


class _Metrics:
    """vLLM-named metrics, exposed through prometheus_client like a real server's."""

    def __init__(self, model: str) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        self.queries = Counter(
            "vllm:prefix_cache_queries", "Prompt tokens looked up", labels, registry=self.registry
        ).labels(model)
        self.hits = Counter(
            "vllm:prefix_cache_hits", "Prompt tokens found cached", labels, registry=self.registry
        ).labels(model)
        self.kv_usage = Gauge(
            "vllm:kv_cache_usage_perc", "KV cache usage (0-1)", labels, registry=self.registry
        ).labels(model)
        self.queue_time = Histogram(
            "vllm:request_queue_time_seconds", "Queue time", labels, registry=self.registry
        ).labels(model)
        self.in_flight = 0


class FakeEndpoint:
    """The server state: which fault comes next, and the metrics."""

    def __init__(self, cfg: FakeEndpointConfig) -> None:
        self.cfg = cfg
        self.metrics = _Metrics(cfg.model)
        self.completions_served = 0  # drives the fault cycle

    def next_fault(self) -> str:
        """The fault for the next completion request."""
        fault = self.cfg.faults[self.completions_served % len(self.cfg.faults)]
        self.completions_served += 1
        return fault


def _response(status: int, body: bytes, content_type: str = "application/json") -> bytes:
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def _error(status: int, message: str) -> bytes:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = error_body(message, kind, code=status)
    return _response(status, json.dumps(body).encode())


def _chunk(payload: dict | str) -> bytes:
    """One SSE event as one HTTP chunk."""
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    event = f"data: {data}\n\n".encode()
    return b"%x\r\n%s\r\n" % (len(event), event)


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; requests are answered one at a time."""

    def __init__(self, endpoint: FakeEndpoint) -> None:
        self.endpoint = endpoint
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task | None = None  # a delayed answer in progress

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if self.task is not None:
            self.task.cancel()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.task is None:
            self._next_request()

    def _next_request(self) -> None:
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
        length = 0
        for line in head[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        if len(self.buffer) < end + 4 + length:
            return
        body = bytes(self.buffer[end + 4 : end + 4 + length])
        del self.buffer[: end + 4 + length]
        method, path = head[0].split(" ")[:2]
        authorized = self.endpoint.cfg.api_key is None or (
            f"authorization: bearer {self.endpoint.cfg.api_key}".lower()
            in (h.lower() for h in head[1:])
        )
        self._route(method, path.split("?")[0], body, authorized)

    def _route(self, method: str, path: str, body: bytes, authorized: bool) -> None:
        ep = self.endpoint
        if path.startswith("/v1/") and not authorized:
            self._send(_error(401, "invalid API key"))
        elif method == "GET" and path == "/health":
            self._send(_response(200, b"{}"))
        elif method == "GET" and path == "/metrics":
            self._send(
                _response(200, generate_latest(ep.metrics.registry), "text/plain; version=0.0.4")
            )
        elif method == "GET" and path == "/v1/models":
            models = {"object": "list", "data": [{"id": ep.cfg.model, "object": "model"}]}
            self._send(_response(200, json.dumps(models).encode()))
        elif method == "POST" and path in ("/v1/completions", "/v1/chat/completions"):
            self._completion(path.endswith("chat/completions"), body)
        else:
            self._send(_error(404, f"no route {method} {path}"))

    def _send(self, data: bytes) -> None:
        self.transport.write(data)
        if self.buffer:
            self._next_request()

    def _completion(self, chat: bool, body: bytes) -> None:
        try:
            request = json.loads(body)
            max_tokens = int(request.get("max_tokens") or 16)
            if chat:
                prompt_tokens = sum(
                    len(str(m.get("content", "")).split()) for m in request["messages"]
                )
            else:
                prompt_tokens = len(str(request["prompt"]).split())
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            self._send(_error(400, f"bad request body: {exc!r}"))
            return
        if not request.get("stream"):
            self._send(_error(400, "this endpoint only streams: set stream=true"))
            return
        fault = self.endpoint.next_fault()
        if fault.startswith("http"):
            self._send(_error(int(fault[4:]), f"injected fault {fault}"))
            return
        if fault == "disconnect":
            self.transport.close()
            return
        cfg = self.endpoint.cfg
        events = _stream_events(chat, cfg.model, fault, max_tokens, prompt_tokens)
        if fault == "stall" or cfg.ttft_s or cfg.itl_s:
            self.task = asyncio.get_running_loop().create_task(
                self._stream_slowly(fault, events, prompt_tokens)
            )
            return
        self._account(prompt_tokens, 0.0)
        self.transport.write(self._stream_head(0.0) + b"".join(events))
        self._finish(fault)

    def _stream_head(self, queue_s: float) -> bytes:
        return (
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\nx-queue-time: %d\r\n\r\n" % round(queue_s * 1000)
        )

    async def _stream_slowly(self, fault: str, events: list[bytes], prompt_tokens: int) -> None:
        cfg = self.endpoint.cfg
        metrics = self.endpoint.metrics
        metrics.in_flight += 1
        metrics.kv_usage.set(min(metrics.in_flight / _KV_SLOTS, 1.0))
        try:
            await asyncio.sleep(_STALL_S if fault == "stall" else cfg.ttft_s)
            self._account(prompt_tokens, cfg.ttft_s)
            self.transport.write(self._stream_head(cfg.ttft_s))
            for event in events:
                self.transport.write(event)
                if cfg.itl_s:
                    await asyncio.sleep(cfg.itl_s)
        finally:
            metrics.in_flight -= 1
            metrics.kv_usage.set(min(metrics.in_flight / _KV_SLOTS, 1.0))
        self.task = None
        self._finish(fault)

    def _account(self, prompt_tokens: int, queue_s: float) -> None:
        m = self.endpoint.metrics
        m.queries.inc(prompt_tokens)
        m.hits.inc(prompt_tokens // 2)  # a fixed 50% hit rate the tests can check
        m.queue_time.observe(queue_s)

    def _finish(self, fault: str) -> None:
        if fault == "drop":
            self.transport.close()  # mid-stream: the chunked body never terminates
            return
        self.transport.write(b"0\r\n\r\n")
        if self.buffer:
            self._next_request()


def _stream_events(
    chat: bool, model: str, fault: str, max_tokens: int, prompt_tokens: int
) -> list[bytes]:
    """The SSE chunks of one streamed answer (before the body's terminating chunk)."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    base = {"id": "cmpl-fake", "object": kind, "created": 0, "model": model}

    def choice(text: str | None, finish: str | None) -> dict:
        if chat:
            delta = {} if text is None else {"content": text}
            return {"index": 0, "delta": delta, "finish_reason": finish}
        return {"index": 0, "text": text or "", "finish_reason": finish}

    events = []
    if chat:
        events.append(
            _chunk(
                base
                | {"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}
            )
        )
    for i in range(max_tokens):
        events.append(_chunk(base | {"choices": [choice(f" tok{i}", None)]}))
        if fault == "drop" and i == 1:
            return events
        if fault == "malformed" and i == 1:
            events.append(_chunk("{this is not json"))
        if fault == "error_event" and i == 1:
            events.append(
                _chunk(error_body("injected error event", "server_error", code=500))
            )
            return events + [_chunk("[DONE]")]
    if fault == "truncated":
        return events
    events.append(_chunk(base | {"choices": [choice(None, "length")]}))
    if fault != "no_usage":
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": max_tokens,
            "total_tokens": prompt_tokens + max_tokens,
        }
        events.append(_chunk(base | {"choices": [], "usage": usage}))
    events.append(_chunk("[DONE]"))
    return events


async def serve(cfg: FakeEndpointConfig, host: str, port: int) -> None:
    """Serve until cancelled; prints `listening on http://HOST:PORT` once bound."""
    endpoint = FakeEndpoint(cfg)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Connection(endpoint), host, port, backlog=1024)
    bound = server.sockets[0].getsockname()[1]
    print(f"listening on http://{host}:{bound}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    """`python -m soberana.bench.fake_endpoint`: run the endpoint until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--model", default="fake-model")
    parser.add_argument("--faults", default="ok", help="comma-separated, applied in turn")
    parser.add_argument("--ttft", type=float, default=0.0, help="seconds before the first token")
    parser.add_argument("--itl", type=float, default=0.0, help="seconds between tokens")
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes")
    args = parser.parse_args(argv)
    try:
        faults = check_faults(args.faults.split(","))
    except ValueError as exc:
        parser.error(str(exc))
    cfg = FakeEndpointConfig(args.model, faults, args.ttft, args.itl, args.api_key)
    try:
        asyncio.run(serve(cfg, args.host, args.port))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
