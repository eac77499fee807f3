"""The one fake OpenAI-compatible HTTP server of the tests (gateway, privacy): a real aiohttp
server that records every inference request it receives (path, headers, parsed and raw body).

It can be healthy, slow, failing (HTTP 500), connection-dropping (before a response or in the
middle of a stream), report a queue on a vLLM-style /metrics — or, with `echo=True`, stand in
for a cloud LLM API: it answers with the `<TYPE_N>` placeholders it received, in the text and
in a tool call's arguments, streamed in pieces of `piece_chars` characters (1 splits every
placeholder at every position), `/v1/messages` in Anthropic's shape. Run it in a thread
(`FakeOpenAI(...).start()`) or as its own process (`python tests/fake_openai.py --port P
--name N`) when a test must kill it.

(`soberana bench`'s tests use the product's own endpoint, soberana/bench/fake_endpoint.py: a raw
asyncio server fast enough to measure the load generator's overhead, with its fault cycle.)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import threading
import time
from dataclasses import dataclass, field

from aiohttp import web
from multidict import CIMultiDict

PLACEHOLDER = re.compile(r"<[A-Z][A-Z0-9_]*_\d+>")


@dataclass
class Received:
    """One inference request as the upstream saw it."""

    path: str
    headers: CIMultiDict  # case-insensitive, as HTTP headers are
    body: dict
    raw: bytes = b""  # the body's bytes as sent


@dataclass
class Behaviour:
    """What the server does; tests change these fields while it runs."""

    # ok | fail (HTTP 500) | reject (HTTP 400) | drop | drop_mid_stream | hang
    # | drop_after_role (a stream's role-only chunk, then the connection drops)
    # | truncate (a stream closed cleanly without a finish_reason or [DONE])
    mode: str = "ok"
    role_chunk: bool = False  # streams open with a role-only chunk, as Soberana and vLLM do
    delay_s: float = 0.0  # before the response headers
    stream_chunks: int = 4
    chunk_delay_s: float = 0.0
    health_status: int = 200
    waiting: float = 0.0  # reported as vllm:num_requests_waiting
    model_name: str = "upstream-model"
    received: list[Received] = field(default_factory=list)
    # echo: answer with the placeholders received (see the module docstring)
    echo: bool = False
    piece_chars: int = 3
    piece_delay_s: float = 0.0
    extra_text: str = ""  # appended to the echo (e.g. an invented placeholder)
    answer_override: str | None = None  # echo mode: answer with this text instead
    finished_at: list[float] = field(default_factory=list)  # when each echo stream ended


class FakeOpenAI:
    """The server; `behaviour` is shared with the test."""

    def __init__(self, name: str = "fake", **behaviour) -> None:
        self.name = name
        self.behaviour = Behaviour(**behaviour)
        self.port = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.cancelled = 0  # requests whose client (the gateway) went away mid-answer
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def received(self) -> list[Received]:
        return self.behaviour.received

    @property
    def raw_bodies(self) -> list[bytes]:
        """Every inference request body, as bytes, in arrival order."""
        return [r.raw for r in self.behaviour.received]

    def received_text(self) -> str:
        """Everything the server ever received, decoded (JSON escapes resolved)."""
        return "\n".join(json.dumps(json.loads(b), ensure_ascii=False) for b in self.raw_bodies)

    def app(self) -> web.Application:
        app = web.Application()
        for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/messages"):
            app.router.add_post(path, self._inference)
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/metrics", self._metrics)
        return app

    # ---- running in a thread -----------------------------------------------------------------

    def start(self, port: int = 0) -> FakeOpenAI:
        ready = threading.Event()

        def serve() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(self._start(port))
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(
            target=serve, name=f"fake-upstream-{self.name}", daemon=True
        )
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fake upstream did not start")
        return self

    async def _start(self, port: int) -> None:
        # handler_cancellation: a request whose connection drops stops, as a real server's does.
        self._runner = web.AppRunner(
            self.app(), access_log=None, shutdown_timeout=0.1, handler_cancellation=True
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port, reuse_address=True)
        await site.start()
        self.port = self._runner.addresses[0][1]

    def stop(self) -> None:
        if self._loop is None:
            return
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop = None

    # ---- handlers ------------------------------------------------------------------------------

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"}, status=self.behaviour.health_status)

    async def _models(self, request: web.Request) -> web.Response:
        data = [{"id": self.behaviour.model_name, "object": "model"}]
        return web.json_response(
            {"object": "list", "data": data}, status=self.behaviour.health_status
        )

    async def _metrics(self, request: web.Request) -> web.Response:
        text = (
            "# HELP vllm:num_requests_waiting Requests waiting.\n"
            "# TYPE vllm:num_requests_waiting gauge\n"
            f'vllm:num_requests_waiting{{model_name="{self.behaviour.model_name}"}} {self.behaviour.waiting}\n'
            "# HELP vllm:kv_cache_usage_perc KV usage.\n"
            "# TYPE vllm:kv_cache_usage_perc gauge\n"
            f'vllm:kv_cache_usage_perc{{model_name="{self.behaviour.model_name}"}} 0.25\n'
        )
        return web.Response(text=text, content_type="text/plain")

    async def _inference(self, request: web.Request) -> web.StreamResponse:
        b = self.behaviour
        raw = await request.read()
        body = json.loads(raw)
        b.received.append(Received(request.path, request.headers.copy(), body, raw))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if b.delay_s:
                await asyncio.sleep(b.delay_s)
            if b.mode == "hang":
                await asyncio.sleep(3600)
            if b.mode == "fail":
                return web.json_response(
                    {
                        "error": {
                            "message": "boom",
                            "type": "server_error",
                            "code": None,
                            "param": None,
                        }
                    },
                    status=500,
                )
            if b.mode == "reject":
                error = {
                    "message": "bad temperature",
                    "type": "invalid_request_error",
                    "param": "temperature",
                    "code": None,
                }
                return web.json_response({"error": error}, status=400)
            if b.mode == "drop":
                request.transport.abort()
                return web.Response()
            if b.echo:
                return await Echo(b).respond(request, body, raw)
            if request.path == "/v1/embeddings":
                return web.json_response(self._embeddings(body))
            if body.get("stream"):
                try:
                    return await self._stream(request, body)
                except ConnectionResetError:  # the gateway dropped the stream: stop generating
                    return web.Response()
            return web.json_response(self._completion(request.path, body))
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.in_flight -= 1

    def _usage(self, completion_tokens: int) -> dict:
        return {
            "prompt_tokens": 7,
            "completion_tokens": completion_tokens,
            "total_tokens": 7 + completion_tokens,
        }

    def _completion(self, path: str, body: dict) -> dict:
        text = f"hello from {self.name}"
        if path == "/v1/completions":
            choice = {"index": 0, "text": text, "finish_reason": "stop"}
            obj = "text_completion"
        else:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
            }
            obj = "chat.completion"
        return {
            "id": "cmpl-1",
            "object": obj,
            "created": int(time.time()),
            "model": body.get("model"),
            "choices": [choice],
            "usage": self._usage(3),
        }

    def _embeddings(self, body: dict) -> dict:
        inputs = body.get("input")
        inputs = inputs if isinstance(inputs, list) else [inputs]
        data = [
            {"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]}
            for i in range(len(inputs))
        ]
        return {
            "object": "list",
            "data": data,
            "model": body.get("model"),
            "usage": {"prompt_tokens": 5, "total_tokens": 5},
        }

    async def _stream(self, request: web.Request, body: dict) -> web.StreamResponse:
        b = self.behaviour
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if b.role_chunk or b.mode == "drop_after_role":
            role = {"role": "assistant", "content": ""}
            chunk = {
                "id": "chatcmpl-1",
                "object": "chat.completion.chunk",
                "model": body.get("model"),
            }
            chunk["choices"] = [{"index": 0, "delta": role, "finish_reason": None}]
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            if b.mode == "drop_after_role":
                await asyncio.sleep(0.2)  # a prefill in progress
                request.transport.abort()
                return response
        for i in range(b.stream_chunks):
            chunk = {
                "id": "chatcmpl-1",
                "object": "chat.completion.chunk",
                "model": body.get("model"),
                "choices": [
                    {"index": 0, "delta": {"content": f"{self.name}-{i} "}, "finish_reason": None}
                ],
            }
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            if b.mode == "drop_mid_stream" and i == 1:
                request.transport.abort()
                return response
            if b.chunk_delay_s:
                await asyncio.sleep(b.chunk_delay_s)
        if b.mode == "truncate":
            await response.write_eof()
            return response
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {
                "id": "chatcmpl-1",
                "object": "chat.completion.chunk",
                "choices": [],
                "usage": self._usage(b.stream_chunks),
            }
            await response.write(b"data: " + json.dumps(usage).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


class Echo:
    """The answers of `echo` mode: the request's placeholders, whole or streamed in pieces."""

    def __init__(self, behaviour: Behaviour) -> None:
        self.b = behaviour

    def answer(self, raw: bytes) -> tuple[str, str]:
        """The answer's text and its tool call's JSON arguments."""
        if self.b.answer_override is not None:
            return self.b.answer_override, "{}"
        seen = list(dict.fromkeys(PLACEHOLDER.findall(raw.decode())))
        text = "Echo: " + " | ".join(seen) + self.b.extra_text
        args = json.dumps({"values": seen, "note": "for " + " and ".join(seen)})
        return text, args

    async def respond(self, request: web.Request, body: dict, raw: bytes) -> web.StreamResponse:
        text, args = self.answer(raw)
        messages_api = request.path == "/v1/messages"
        if not body.get("stream"):
            if messages_api:
                return web.json_response(self.anthropic_message(body, text, args))
            return web.json_response(self.openai_message(body, text, args))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        events = (self.anthropic_events(text, args) if messages_api
                  else self.openai_events(text, args, body))  # fmt: skip
        for event in events:
            await response.write(event)
            if self.b.piece_delay_s:
                await asyncio.sleep(self.b.piece_delay_s)
        self.b.finished_at.append(time.monotonic())
        await response.write_eof()
        return response

    def pieces(self, text: str) -> list[str]:
        n = self.b.piece_chars
        return [text[i : i + n] for i in range(0, len(text), n)]

    @staticmethod
    def openai_message(body: dict, text: str, args: str) -> dict:
        call = {"id": "call_1", "type": "function",
                "function": {"name": "lookup", "arguments": args}}  # fmt: skip
        message = {"role": "assistant", "content": text, "tool_calls": [call]}
        return {
            "id": "c1",
            "object": "chat.completion",
            "model": body.get("model"),
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
        }

    @staticmethod
    def anthropic_message(body: dict, text: str, args: str) -> dict:
        return {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": body.get("model"),
            "content": [
                {"type": "text", "text": text},
                {"type": "tool_use", "id": "tu_1", "name": "lookup", "input": json.loads(args)},
            ],
            "stop_reason": "end_turn",
            "usage": {"input_tokens": 10, "output_tokens": 5},
        }

    def openai_events(self, text: str, args: str, body: dict) -> list[bytes]:
        def chunk(delta: dict, finish: str | None = None) -> bytes:
            obj = {
                "id": "c1",
                "object": "chat.completion.chunk",
                "model": body.get("model"),
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            return b"data: " + json.dumps(obj).encode() + b"\n\n"

        call = {"index": 0, "id": "call_1", "type": "function",
                "function": {"name": "lookup", "arguments": ""}}  # fmt: skip
        events = [chunk({"role": "assistant", "content": ""})]
        events += [chunk({"content": p}) for p in self.pieces(text)]
        events.append(chunk({"tool_calls": [call]}))
        events += [chunk({"tool_calls": [{"index": 0, "function": {"arguments": p}}]})
                   for p in self.pieces(args)]  # fmt: skip
        events.append(chunk({}, "tool_calls"))
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {
                "id": "c1",
                "object": "chat.completion.chunk",
                "choices": [],
                "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
            }
            events.append(b"data: " + json.dumps(usage).encode() + b"\n\n")
        events.append(b"data: [DONE]\n\n")
        return events

    def anthropic_events(self, text: str, args: str) -> list[bytes]:
        def event(kind: str, obj: dict) -> bytes:
            data = json.dumps({"type": kind, **obj}).encode()
            return f"event: {kind}\ndata: ".encode() + data + b"\n\n"

        tool_use = {"type": "tool_use", "id": "tu_1", "name": "lookup", "input": {}}
        events = [
            event("message_start", {"message": {"id": "msg_1", "role": "assistant", "content": []}}),
            event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
        ]  # fmt: skip
        events += [event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": p}})
                   for p in self.pieces(text)]  # fmt: skip
        events.append(event("content_block_stop", {"index": 0}))
        events.append(event("content_block_start", {"index": 1, "content_block": tool_use}))
        events += [event("content_block_delta",
                         {"index": 1, "delta": {"type": "input_json_delta", "partial_json": p}})
                   for p in self.pieces(args)]  # fmt: skip
        events.append(event("content_block_stop", {"index": 1}))
        events.append(event("message_delta", {"delta": {"stop_reason": "tool_use"},
                                              "usage": {"output_tokens": 5}}))  # fmt: skip
        events.append(event("message_stop", {}))
        return events


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--name", default="fake")
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--chunk-delay", type=float, default=0.0)
    parser.add_argument("--chunks", type=int, default=4)
    args = parser.parse_args()
    upstream = FakeOpenAI(
        args.name, delay_s=args.delay, chunk_delay_s=args.chunk_delay, stream_chunks=args.chunks
    )

    async def serve() -> None:
        await upstream._start(args.port)
        print(f"listening on {upstream.port}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
