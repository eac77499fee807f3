"""What chat and completions share: merging output deltas, usage, SSE framing, disconnects."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from json.encoder import encode_basestring  # what json.dumps(ensure_ascii=False) uses
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from soberana.engine.outputs import Logprob, RequestOutput
from soberana.server.engine_client import (
    EngineDeadError,
    EngineRejectedError,
    RequestStream,
    ServerShuttingDownError,
)
from soberana.server.errors import OpenAIError, logger

SSE_DONE = "data: [DONE]\n\n"
TEXT_SLOT = "\x00text\x00"  # marks where the text goes in a `text_events` template
_MIN_LOGPROB = -9999.0  # JSON has no -inf; vLLM reports this instead


@dataclass
class Choice:
    """One sample's text, tokens and logprobs: a delta in a stream, or the whole answer."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


def merge_outputs(outputs: list[RequestOutput], into: dict[int, Choice]) -> None:
    """Append the sample deltas of `outputs` (in arrival order) to the choices in `into`."""
    for output in outputs:
        for sample in output.outputs:
            choice = into.get(sample.index)
            if choice is None:
                choice = into[sample.index] = Choice(sample.index)
            choice.text += sample.text
            choice.token_ids.extend(sample.token_ids)
            if sample.logprobs is not None:
                choice.logprobs = (choice.logprobs or []) + sample.logprobs
            if sample.finish_reason is not None:
                choice.finish_reason = sample.finish_reason
                choice.stop_reason = sample.stop_reason


async def collect(stream: RequestStream) -> tuple[dict[int, Choice], RequestOutput]:
    """Wait for a whole request; return its choices and its last RequestOutput."""
    choices: dict[int, Choice] = {}
    while True:
        outputs = await stream.get()
        merge_outputs(outputs, choices)
        if outputs[-1].finished:
            return choices, outputs[-1]


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    """OpenAI's usage object, cached prompt tokens included."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def sse(payload: dict) -> str:
    """One server-sent event carrying a JSON object."""
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def text_events(template: str) -> Callable[[str], str]:
    """Events like `template` (an `sse` event holding `TEXT_SLOT`), each with its own text.

    The JSON around the text is encoded once; each event then costs one string encoding and
    a concatenation instead of building and encoding the whole payload per token. The bytes
    are exactly those `sse` gives for the payload with the text in place.
    """
    head, tail = template.split(encode_basestring(TEXT_SLOT))

    def event(text: str) -> str:
        return f"{head}{encode_basestring(text)}{tail}"

    return event


class ChunkStream:
    """The skeleton every OpenAI stream shares (chat and completions): the chunk envelope,
    usage (only at the end, or on every chunk with `continuous_usage_stats`), the finish
    event, and the ending — the final usage chunk, an error event if the stream failed after
    its headers were sent, the request's abort, then [DONE].

    The endpoint keeps `generated` and `cached` current; `event` and `finish` read them.
    """

    def __init__(self, header: dict, object_name: str, stream_options: Any, prompt_tokens: int
                 ) -> None:  # fmt: skip
        self.base = {**header, "object": object_name}
        self.include_usage = bool(stream_options is not None and stream_options.include_usage)
        self.continuous = self.include_usage and bool(stream_options.continuous_usage_stats)
        self.prompt_tokens = prompt_tokens
        self.generated = 0  # completion tokens so far
        self.cached = 0  # prompt tokens served from the prefix cache

    def usage(self) -> dict:
        """The usage object as of now."""
        return usage(self.prompt_tokens, self.generated, self.cached)

    def event(self, entry: dict) -> str:
        """The chunk carrying one choice's `entry` (usage null, or running with continuous)."""
        payload = {**self.base, "choices": [entry]}
        if self.include_usage:
            payload["usage"] = self.usage() if self.continuous else None
        return sse(payload)

    def finish(self, entry: dict, choice: Choice, finish_reason: str | None = None) -> str:
        """The chunk that ends a choice: `entry` (its index and an empty delta or text) with
        the finish and stop reasons."""
        return self.event({**entry, "logprobs": None,
                           "finish_reason": finish_reason or choice.finish_reason,
                           "stop_reason": choice.stop_reason})  # fmt: skip

    async def run(self, events: AsyncIterator[str], abort: Callable[[], None]
                  ) -> AsyncIterator[str]:  # fmt: skip
        """`events`, then the usage chunk; an error event on failure; `abort` (a no-op for a
        finished request, freeing the KV blocks of one the client left); then [DONE]."""
        try:
            async for event in events:
                yield event
            if self.include_usage:
                yield sse({**self.base, "choices": [], "usage": self.usage()})
        except Exception as exc:  # headers are sent: the error travels as an event
            yield stream_error(exc)
        finally:
            abort()
        yield SSE_DONE


def stream_error(exc: Exception) -> str:
    """The SSE event that ends a stream which failed after its headers were sent."""
    if isinstance(exc, ServerShuttingDownError):
        error = OpenAIError(503, str(exc), code="server_shutting_down")
    elif isinstance(exc, EngineDeadError):
        error = OpenAIError(503, f"the engine stopped: {exc}")
    elif isinstance(exc, EngineRejectedError):
        error = OpenAIError(400, str(exc))
    else:
        logger.exception("stream failed")
        error = OpenAIError(500, f"Internal server error: {type(exc).__name__}")
    return sse(error.body())


def safe_logprob(value: float) -> float:
    return max(value, _MIN_LOGPROB)


def ranked(entries: dict[int, Logprob], top_n: int) -> list[tuple[int, Logprob]]:
    """The top `top_n` entries of one position's logprobs, best first."""
    top = [(tid, lp) for tid, lp in entries.items() if lp.rank is not None and lp.rank <= top_n]
    top.sort(key=lambda item: item[1].rank)
    return top[:top_n]


async def cancel_on_disconnect(work: Awaitable[Any], receive: Receive) -> Any:
    """Run `work` until it finishes or the client disconnects; then cancel it.

    The request body has been read, so the next ASGI message can only be the disconnect.
    Returns None when the client left.
    """
    work_task = asyncio.ensure_future(work)
    watch_task = asyncio.ensure_future(_wait_disconnect(receive))
    try:
        await asyncio.wait({work_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch_task.cancel()
        if not work_task.done():
            work_task.cancel()
            await asyncio.gather(work_task, return_exceptions=True)
    if work_task.cancelled():
        return None
    return work_task.result()


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class EventStream(StreamingResponse):
    """SSE response whose producer is cancelled as soon as the client disconnects.

    Starlette notices a gone client only on the next write; a request still waiting for its
    first token would keep its place in the engine. The producer's `finally` aborts it.
    """

    def __init__(self, events: AsyncIterator[str]) -> None:
        super().__init__(
            events,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await cancel_on_disconnect(self.stream_response(send), receive)
        except OSError:
            pass  # the client went away between two writes
        finally:
            await _close(self.body_iterator)


async def _close(events: Any) -> None:
    aclose: Callable[[], Awaitable[None]] | None = getattr(events, "aclose", None)
    if aclose is not None:
        await aclose()
