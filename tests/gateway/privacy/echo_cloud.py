"""A recording stand-in for a cloud LLM API: it keeps every raw request body and answers with
the placeholders it received, so tests can check what left the site and what came back.

Chat answers repeat every `<TYPE_N>` placeholder of the request in the text and in a tool
call's arguments; streams cut that answer into pieces of `piece_chars` characters (1 puts a
chunk boundary at every position, so every placeholder is split at every possible place) and
send each piece as its own write, `piece_delay_s` apart. `/v1/messages` answers in Anthropic's
shape and event stream.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from dataclasses import dataclass, field

from aiohttp import web

PLACEHOLDER = re.compile(r"<[A-Z][A-Z0-9_]*_\d+>")


@dataclass
class EchoBehaviour:
    piece_chars: int = 3
    piece_delay_s: float = 0.0
    extra_text: str = ""  # appended to the answer (e.g. an invented placeholder)
    answer_override: str | None = None  # answer with this text instead of the echo
    raw_bodies: list[bytes] = field(default_factory=list)
    finished_at: list[float] = field(default_factory=list)  # when each stream's last byte was sent


class EchoCloud:
    def __init__(self, **behaviour) -> None:
        self.behaviour = EchoBehaviour(**behaviour)
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def received_text(self) -> str:
        """Everything the cloud ever received, decoded (JSON escapes resolved)."""
        return "\n".join(
            json.dumps(json.loads(b), ensure_ascii=False) for b in self.behaviour.raw_bodies
        )

    def start(self) -> EchoCloud:
        ready = threading.Event()

        def serve() -> None:
            self._loop = asyncio.new_event_loop()
            app = web.Application()
            for path in ("/v1/chat/completions", "/v1/completions", "/v1/messages"):
                app.router.add_post(path, self._inference)
            app.router.add_get("/health", self._ok)
            app.router.add_get("/v1/models", self._ok)
            self._runner = web.AppRunner(app)
            self._loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            self._loop.run_until_complete(site.start())
            self.port = self._runner.addresses[0][1]
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=serve, daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _ok(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": []})

    # ---- answers ---------------------------------------------------------------------------

    def _answer(self, raw: bytes) -> tuple[str, str]:
        b = self.behaviour
        if b.answer_override is not None:
            return b.answer_override, "{}"
        seen = list(dict.fromkeys(PLACEHOLDER.findall(raw.decode())))
        text = "Echo: " + " | ".join(seen) + b.extra_text
        args = json.dumps({"values": seen, "note": "for " + " and ".join(seen)})
        return text, args

    async def _inference(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        self.behaviour.raw_bodies.append(raw)
        body = json.loads(raw)
        text, args = self._answer(raw)
        messages_api = request.path == "/v1/messages"
        if not body.get("stream"):
            if messages_api:
                return web.json_response(
                    {
                        "id": "msg_1",
                        "type": "message",
                        "role": "assistant",
                        "model": body.get("model"),
                        "content": [
                            {"type": "text", "text": text},
                            {
                                "type": "tool_use",
                                "id": "tu_1",
                                "name": "lookup",
                                "input": json.loads(args),
                            },
                        ],
                        "stop_reason": "end_turn",
                        "usage": {"input_tokens": 10, "output_tokens": 5},
                    }
                )
            message = {
                "role": "assistant",
                "content": text,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "lookup", "arguments": args},
                    }
                ],
            }
            return web.json_response(
                {
                    "id": "c1",
                    "object": "chat.completion",
                    "model": body.get("model"),
                    "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
                }
            )
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        events = (
            self._anthropic_events(text, args)
            if messages_api
            else self._openai_events(text, args, body)
        )
        for event in events:
            await response.write(event)
            if self.behaviour.piece_delay_s:
                await asyncio.sleep(self.behaviour.piece_delay_s)
        self.behaviour.finished_at.append(time.monotonic())
        await response.write_eof()
        return response

    def _pieces(self, text: str) -> list[str]:
        n = self.behaviour.piece_chars
        return [text[i : i + n] for i in range(0, len(text), n)]

    def _openai_events(self, text: str, args: str, body: dict) -> list[bytes]:
        def chunk(delta: dict, finish: str | None = None) -> bytes:
            obj = {
                "id": "c1",
                "object": "chat.completion.chunk",
                "model": body.get("model"),
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            return b"data: " + json.dumps(obj).encode() + b"\n\n"

        events = [chunk({"role": "assistant", "content": ""})]
        events += [chunk({"content": p}) for p in self._pieces(text)]
        events.append(
            chunk(
                {
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "lookup", "arguments": ""},
                        }
                    ]
                }
            )
        )
        events += [
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": p}}]})
            for p in self._pieces(args)
        ]
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

    def _anthropic_events(self, text: str, args: str) -> list[bytes]:
        def event(kind: str, obj: dict) -> bytes:
            return (
                f"event: {kind}\ndata: ".encode()
                + json.dumps({"type": kind, **obj}).encode()
                + b"\n\n"
            )

        events = [
            event(
                "message_start", {"message": {"id": "msg_1", "role": "assistant", "content": []}}
            ),
            event(
                "content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}
            ),
        ]
        events += [
            event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": p}})
            for p in self._pieces(text)
        ]
        events.append(event("content_block_stop", {"index": 0}))
        events.append(
            event(
                "content_block_start",
                {
                    "index": 1,
                    "content_block": {
                        "type": "tool_use",
                        "id": "tu_1",
                        "name": "lookup",
                        "input": {},
                    },
                },
            )
        )
        events += [
            event(
                "content_block_delta",
                {"index": 1, "delta": {"type": "input_json_delta", "partial_json": p}},
            )
            for p in self._pieces(args)
        ]
        events.append(event("content_block_stop", {"index": 1}))
        events.append(
            event(
                "message_delta",
                {"delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 5}},
            )
        )
        events.append(event("message_stop", {}))
        return events
