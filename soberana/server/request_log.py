"""One log line per finished HTTP request, under the request's X-Request-Id.

The id is the client's (or the gateway's) `X-Request-Id` when it is a sane token, else a new
one; it is echoed in the response. The middleware opens a `RequestRecord` in a context
variable; the engine client, which runs inside the same request context when a request is
added, keeps a reference and fills in tokens, TTFT and finish reasons as the engine reports
them. The line is written when the response body has been sent (streams included).
"""

from __future__ import annotations

import contextvars
import logging
import re
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("soberana.request")

REQUEST_ID_HEADER = b"x-request-id"
# What we accept from a client as an id: short, and nothing that could forge a log line or a
# header (no spaces, quotes, control characters). Anything else gets a fresh id.
_VALID_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")


@dataclass
class RequestRecord:
    """What the request line reports; the engine client adds to it as outputs arrive."""

    request_id: str
    arrival: float
    model: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    first_token: float | None = None
    finish_reasons: list[str] = field(default_factory=list)
    engine_requests: list = field(default_factory=list)  # their RequestTimes, for trace spans


current_request: contextvars.ContextVar[RequestRecord | None] = contextvars.ContextVar(
    "soberana_request", default=None
)


def request_id_from(headers: Iterable[tuple[bytes, bytes]]) -> str:
    """The caller's X-Request-Id when valid, else a fresh one."""
    for name, value in headers:
        if name.lower() == REQUEST_ID_HEADER:
            text = value.decode("latin-1")
            if _VALID_ID.fullmatch(text):
                return text
    return uuid.uuid4().hex


def note_model(name: str) -> None:
    """The served model name the request asked for (set by the route)."""
    record = current_request.get()
    if record is not None:
        record.model = name


def note_finished(record: RequestRecord | None, times, reasons: list[str], cached_tokens: int) -> None:
    """One engine request of this HTTP request is over (a completion may hold several)."""
    if record is None:
        return
    record.prompt_tokens += times.prompt_tokens
    record.completion_tokens += times.generated
    record.cached_tokens += cached_tokens
    if times.first_token is not None:
        first = times.first_token
        record.first_token = first if record.first_token is None else min(record.first_token, first)
    record.finish_reasons += reasons
    record.engine_requests.append(times)


class RequestLogMiddleware:
    """Assigns/echoes X-Request-Id and logs one line per request (not for `quiet_paths`)."""

    def __init__(self, app: ASGIApp, quiet_paths: Iterable[str] = (), tracing=None) -> None:
        self.app = app
        self.quiet_paths = set(quiet_paths)
        self.tracing = tracing  # soberana.tracing.Tracing, or None: no spans

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        record = RequestRecord(request_id_from(scope["headers"]), time.time())
        token = current_request.set(record)
        status = 500  # what the client sees if the app fails before it answers

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [h for h in message.get("headers", []) if h[0].lower() != REQUEST_ID_HEADER]
                message = {**message, "headers": [*headers, (REQUEST_ID_HEADER, record.request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            current_request.reset(token)
            if scope["path"] not in self.quiet_paths:
                end = time.time()
                _log(record, scope, status, end)
                if self.tracing is not None:
                    from soberana.server.request_trace import emit_request_spans

                    emit_request_spans(self.tracing, scope, record, status, end)


def _log(record: RequestRecord, scope: Scope, status: int, now: float) -> None:
    reasons = sorted(set(record.finish_reasons))
    fields = {
        "request_id": record.request_id,
        "tenant": scope.get("state", {}).get("tenant"),
        "method": scope["method"],
        "path": scope["path"],
        "status": status,
        "model": record.model,
        "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens,
        "cached_tokens": record.cached_tokens,
        "ttft_s": None if record.first_token is None else round(record.first_token - record.arrival, 4),
        "e2e_s": round(now - record.arrival, 4),
        "finish_reason": ",".join(reasons) if reasons else None,
    }
    logger.info("request finished", extra={"fields": fields})


class _QuietAccessLog(logging.Filter):
    def __init__(self, paths: Iterable[str]) -> None:
        super().__init__()
        self.paths = set(paths)

    def filter(self, record: logging.LogRecord) -> bool:
        # uvicorn's access record args: (client, method, path with query, http version, status)
        args = record.args if isinstance(record.args, tuple) else ()
        return not (len(args) >= 3 and str(args[2]).split("?")[0] in self.paths)


def filter_access_log(paths: Iterable[str]) -> None:
    """Drop uvicorn access lines of probe and scrape paths."""
    logging.getLogger("uvicorn.access").addFilter(_QuietAccessLog(paths))
