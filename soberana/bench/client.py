"""Sends one streamed OpenAI request and times it: TTFT, inter-token latencies, end to end."""

from __future__ import annotations

import json
from time import perf_counter

import aiohttp

from soberana.bench.config import Target
from soberana.bench.request import RequestResult, RequestSpec

_ERROR_BODY_LIMIT = 2000  # characters of a non-200 body kept in the error message


class TargetUnavailable(RuntimeError):
    """The target could not be described before the run (e.g. GET /models failed)."""


class StreamingClient:
    """Streams requests to one target over a shared aiohttp session."""

    def __init__(self, session: aiohttp.ClientSession, target: Target) -> None:
        self.session = session
        self.target = target
        self.url = target.url
        self.chat = target.endpoint == "chat"
        self.headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if target.api_key:
            self.headers["Authorization"] = f"Bearer {target.api_key}"
        self.timeout = aiohttp.ClientTimeout(total=target.timeout_s)
        self.run_start = perf_counter()  # start_s of each result is relative to this

    def body(self, spec: RequestSpec) -> dict:
        """The JSON body for `spec`: streamed, with usage in the last chunk, plus --extra-body."""
        body: dict = {
            "model": self.target.model,
            "max_tokens": spec.max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.chat:
            body["messages"] = spec.messages
        else:
            body["prompt"] = spec.prompt_text()
        body.update(self.target.extra_body)
        return body

    async def send(self, spec: RequestSpec) -> RequestResult:
        """Send `spec` and return its timings; failures are recorded, never raised."""
        result = RequestResult(spec=spec)
        payload = json.dumps(self.body(spec))
        start = perf_counter()
        result.start_s = start - self.run_start
        try:
            async with self.session.post(
                self.url, data=payload, headers=self.headers, timeout=self.timeout
            ) as resp:
                result.status = resp.status
                if resp.status != 200:
                    text = await resp.text(errors="replace")
                    _fail(result, f"http_{resp.status}", _error_message(text))
                    return result
                queue_ms = resp.headers.get("x-queue-time")  # TGI's header, in milliseconds
                if queue_ms is not None:
                    result.queue_time_s = _float(queue_ms, scale=1e-3)
                await self._read_stream(resp, result, start)
        except TimeoutError:
            _fail(result, "timeout", f"no complete answer within {self.target.timeout_s:g} s")
        except aiohttp.ClientConnectorError as exc:
            _fail(result, "connection_error", str(exc))
        except (
            aiohttp.ClientPayloadError,
            aiohttp.ServerDisconnectedError,
            aiohttp.ClientOSError,
        ) as exc:
            _fail(result, "disconnected", str(exc) or type(exc).__name__)
        except aiohttp.ClientError as exc:
            _fail(result, "connection_error", f"{type(exc).__name__}: {exc}")
        return result

    async def _read_stream(
        self, resp: aiohttp.ClientResponse, result: RequestResult, start: float
    ) -> None:
        """Consume the SSE stream, stamping each chunk that carries text."""
        pieces: list[str] = []
        last = start
        end = None
        try:
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue  # blank separators, comments, `event:`/`id:` fields
                data = line[5:].strip()
                if data == b"[DONE]":
                    # Read on to the end of the body: a fully read response keeps its
                    # connection alive for the next request.
                    end = perf_counter()
                    continue
                try:
                    chunk = json.loads(data)
                    text = self._chunk_text(chunk, result)
                except (ValueError, AttributeError, LookupError, TypeError):
                    _fail(result, "malformed_sse", f"not an OpenAI stream chunk: {data[:200]!r}")
                    return
                if "error" in chunk:
                    _fail(result, "stream_error", _error_message(json.dumps(chunk)))
                    return
                if text:
                    now = perf_counter()
                    if pieces:
                        result.itl_s.append(now - last)
                    else:
                        result.ttft_s = now - start
                    last = now
                    pieces.append(text)
        except ValueError as exc:  # aiohttp: a line longer than its read buffer
            _fail(result, "malformed_sse", str(exc))
            return
        result.e2e_s = (end or perf_counter()) - start
        result.text = "".join(pieces)
        if end is None and result.finish_reason is None:
            _fail(result, "incomplete_stream", "the stream ended without [DONE] or a finish_reason")

    def _chunk_text(self, chunk: dict, result: RequestResult) -> str | None:
        """The text a chunk carries; records finish_reason and usage on the way."""
        text = None
        choices = chunk.get("choices")
        if choices:
            choice = choices[0]
            if self.chat:
                delta = choice.get("delta") or {}
                text = (
                    delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning")
                )
            else:
                text = choice.get("text")
            if choice.get("finish_reason"):
                result.finish_reason = choice["finish_reason"]
        if chunk.get("usage"):
            _read_usage(chunk, result)
        if text is not None and not isinstance(text, str):
            raise TypeError("chunk text is not a string")
        return text


def _read_usage(chunk: dict, result: RequestResult) -> None:
    """Token counts (and queue time, where a server reports it) from a usage chunk."""
    usage = chunk["usage"]
    result.prompt_tokens = usage.get("prompt_tokens")
    result.output_tokens = usage.get("completion_tokens")
    details = usage.get("prompt_tokens_details") or {}
    if details.get("cached_tokens") is not None:
        result.cached_tokens = details["cached_tokens"]
    # Seconds: Groq's `x_groq.usage.queue_time`, Cerebras' `time_info.queue_time`.
    for holder in (
        usage,
        (chunk.get("x_groq") or {}).get("usage") or {},
        chunk.get("time_info") or {},
    ):
        if holder.get("queue_time") is not None:
            result.queue_time_s = _float(holder["queue_time"], scale=1.0)


def _fail(result: RequestResult, error_type: str, message: str) -> None:
    result.error_type = error_type
    result.error_message = message[:_ERROR_BODY_LIMIT]


def _error_message(text: str) -> str:
    """The `error.message` of an OpenAI-shaped error body, else the body itself."""
    try:
        error = json.loads(text).get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str):
            return error
    except (ValueError, AttributeError):
        pass
    return text.strip()


def _float(value: object, scale: float) -> float | None:
    try:
        return float(value) * scale
    except (TypeError, ValueError):
        return None


async def fetch_models(session: aiohttp.ClientSession, target: Target) -> list[dict]:
    """The model entries of `GET {base_url}/models` (id, and for vLLM/Soberana the local `root`)."""
    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    timeout = aiohttp.ClientTimeout(total=min(target.timeout_s, 30))
    url = target.base_url + "/models"
    try:
        async with session.get(url, headers=headers, timeout=timeout) as resp:
            body = await resp.json(content_type=None)
            if resp.status != 200:
                raise TargetUnavailable(f"GET {url} answered {resp.status}: {str(body)[:200]}")
            return [m for m in body["data"] if isinstance(m, dict) and "id" in m]
    except (aiohttp.ClientError, TimeoutError, ValueError, TypeError, KeyError) as exc:
        raise TargetUnavailable(f"could not list models at {url}: {exc!r}") from exc
