"""One attempt against one backend: send the request, relay the response, or report why not."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from soberana.gateway.backend import BackendState
from soberana.gateway.config import TimeoutConfig
from soberana.gateway.errors import sse_error_event
from soberana.gateway.stream_start import first_token_reached
from soberana.gateway.usage import SseUsageTap, Usage
from soberana.tracing import inject

_CONNECTION_ERRORS = (aiohttp.ClientError, OSError)


class UpstreamFailure(Exception):
    """The attempt failed before anything reached the client, so another backend may be tried.

    `detail` reaches the client (in a 502) and names the backend only by its configured name;
    `internal` (addresses, the upstream's own error text) goes to the operator's log only.
    """

    def __init__(
        self, reason: str, detail: str, backend_fault: bool = True, internal: str = ""
    ) -> None:
        super().__init__(detail)
        self.reason = reason  # connect | timeout | disconnected | http_5xx | http_429 | ...
        self.detail = detail
        self.backend_fault = backend_fault  # counts towards passive ejection
        self.internal = internal


@dataclass
class Exchange:
    """Per-request facts the relay fills in for metrics and accounting."""

    request_id: str
    stream: bool
    strip_usage_event: bool  # the gateway asked for stream usage on the client's behalf
    usage: Usage = field(default_factory=Usage)
    upstream_s: float = 0.0  # time spent waiting on upstreams, all attempts together
    queue_s: float = 0.0  # time spent waiting for a free backend slot
    ready_at: float = 0.0  # perf_counter() when the response (or its first chunk) was ready
    stream_failure: str | None = None  # why a stream broke after the client got bytes
    privacy: Any = None  # privacy.layer.RequestPrivacy (issue 22): redaction and rehydration
    # The last successful attempt, from sending it: its first byte (headers; streams: the first
    # token) and its whole body (streams: the end of the stream).
    first_byte_s: float = 0.0
    total_s: float = 0.0


class Upstream:
    """Sends requests over one pooled keep-alive client session."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session

    async def attempt(
        self,
        request: web.Request,
        backend: BackendState,
        path: str,
        payload: bytes,
        timeouts: TimeoutConfig,
        exchange: Exchange,
    ) -> web.StreamResponse:
        """Relay one backend's answer, or raise UpstreamFailure if none can be relayed."""
        headers = {"Content-Type": "application/json", "X-Request-Id": exchange.request_id}
        inject(headers)  # W3C traceparent: the gateway's span, or the client's own context
        if backend.api_key:
            headers["Authorization"] = "Bearer " + backend.api_key
        url = backend.config.endpoint + path
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeouts.connect_s)
        started = time.perf_counter()
        # privacy hook (issue 22): rehydrates placeholders and runs the output check
        transform = exchange.privacy.response_transform(backend) if exchange.privacy else None
        try:
            async with asyncio.timeout(timeouts.first_byte_s) as deadline:
                with backend.watch(deadline):
                    response = await self.session.post(
                        url, data=payload, headers=headers, timeout=timeout
                    )
            exchange.first_byte_s = time.perf_counter() - started
            try:
                if exchange.stream and response.status == 200:
                    return await self._relay_stream(
                        request, backend, response, timeouts, exchange, started, transform
                    )
                return await self._relay_body(
                    backend, response, timeouts, exchange, started, transform
                )
            except asyncio.CancelledError:
                # The client went away (aiohttp cancels the handler): drop the upstream
                # connection so the backend stops generating and its slot frees.
                response.close()
                raise
            finally:
                response.release()
        except TimeoutError:
            exchange.upstream_s += time.perf_counter() - started
            if not backend.available(time.monotonic()):
                # Cut short by `cancel_unanswered`: probes marked the backend down meanwhile.
                raise UpstreamFailure(
                    "backend_down",
                    f"{backend.name}: marked down before it answered",
                    backend_fault=False,  # the probes have already taken it out
                ) from None
            raise UpstreamFailure("timeout", f"{backend.name}: no response in time") from None
        except aiohttp.ClientConnectorError as e:
            exchange.upstream_s += time.perf_counter() - started
            raise UpstreamFailure(
                "connect", f"{backend.name}: cannot connect", internal=str(e)
            ) from None
        except _CONNECTION_ERRORS as e:
            exchange.upstream_s += time.perf_counter() - started
            raise UpstreamFailure(
                "disconnected",
                f"{backend.name}: connection lost ({type(e).__name__})",
                internal=str(e),
            ) from None

    async def _relay_body(
        self,
        backend: BackendState,
        response: aiohttp.ClientResponse,
        timeouts: TimeoutConfig,
        exchange: Exchange,
        started: float,
        transform: Any = None,
    ) -> web.Response:
        # A non-streaming client has nothing until the whole body: this is still "unanswered".
        async with asyncio.timeout(timeouts.idle_s) as deadline:
            with backend.watch(deadline):
                body = await response.read()
        exchange.upstream_s += time.perf_counter() - started
        exchange.total_s = time.perf_counter() - started
        if response.status >= 500:
            raise UpstreamFailure(
                "http_5xx",
                f"{backend.name}: HTTP {response.status}",
                internal=body[:500].decode(errors="replace"),
            )
        if response.status == 429:
            # A backend's own rate limit says it is busy, not broken: try another, do not eject.
            raise UpstreamFailure("http_429", f"{backend.name}: HTTP 429", backend_fault=False)
        if response.status == 200 and b"_tokens" in body:
            exchange.usage.scan(body)
        status = response.status
        if transform is not None:
            status, body = await transform.body(status, body)
        out = web.Response(status=status, body=body)
        out.headers["Content-Type"] = response.headers.get("Content-Type", "application/json")
        out.headers["X-Gateway-Backend"] = backend.name
        exchange.ready_at = time.perf_counter()
        return out

    async def _relay_stream(
        self,
        request: web.Request,
        backend: BackendState,
        response: aiohttp.ClientResponse,
        timeouts: TimeoutConfig,
        exchange: Exchange,
        started: float,
        transform: Any = None,
    ) -> web.StreamResponse:
        # Nothing is sent to the client before the first token is in hand (see stream_start):
        # a backend that dies or is marked down before it can still be retried elsewhere.
        held = b""
        async with asyncio.timeout(timeouts.first_byte_s) as deadline:
            with backend.watch(deadline):
                while not first_token_reached(held):
                    chunk = await response.content.readany()
                    if not chunk:
                        raise UpstreamFailure(
                            "disconnected", f"{backend.name}: stream ended before its first token"
                        )
                    held += chunk
        exchange.upstream_s += time.perf_counter() - started
        exchange.first_byte_s = time.perf_counter() - started
        out = web.StreamResponse(status=200)
        out.headers["Content-Type"] = response.headers.get("Content-Type", "text/event-stream")
        out.headers["Cache-Control"] = "no-cache"
        out.headers["X-Request-Id"] = exchange.request_id
        out.headers["X-Gateway-Backend"] = backend.name
        tap = SseUsageTap(exchange.strip_usage_event)
        # privacy hook: rehydration and the output check (which may hold text until it passes)
        rehydrate = transform.feed if transform is not None else _same
        try:
            await out.prepare(request)
            await out.write(tap.feed(await rehydrate(held)))
            exchange.ready_at = time.perf_counter()
            while True:
                try:
                    async with asyncio.timeout(timeouts.idle_s):
                        chunk = await response.content.readany()
                except (TimeoutError, aiohttp.ClientError, OSError) as e:
                    reason = "no data in time" if isinstance(e, TimeoutError) else type(e).__name__
                    exchange.stream_failure = "stream_interrupted"
                    await out.write(
                        (tap.feed(await transform.flush()) if transform is not None else b"")
                        + tap.flush()
                        + sse_error_event(
                            f"backend {backend.name} failed mid-stream ({reason}); the response is incomplete",
                            "upstream_stream_interrupted",
                        )
                    )
                    break
                if not chunk:
                    rest = tap.feed(await transform.flush()) if transform is not None else b""
                    rest += tap.flush()
                    if not tap.finished:
                        # A clean close without a finish_reason or [DONE] is a cut, not an end.
                        exchange.stream_failure = "stream_truncated"
                        rest += sse_error_event(
                            f"backend {backend.name} ended the stream before it finished; "
                            "the response is incomplete",
                            "upstream_stream_truncated",
                        )
                    await out.write(rest)
                    break
                data = tap.feed(await rehydrate(chunk))
                if data:
                    await out.write(data)
            await out.write_eof()
        except OSError:
            # The client went away (a reset, or a write to a closed transport): drop the
            # upstream connection so the backend stops generating for nobody.
            response.close()
        exchange.total_s = time.perf_counter() - started
        exchange.usage = tap.usage
        if not tap.usage.reported:
            exchange.usage.completion_tokens = max(0, tap.data_events - 1)  # minus [DONE]
        return out


async def _same(chunk: bytes) -> bytes:
    return chunk
