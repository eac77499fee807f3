"""OpenAI-shaped errors raised and returned by the gateway itself."""

from __future__ import annotations

import json

from aiohttp import web

from soberana.openai_error import error_body


class GatewayError(Exception):
    """An error the client gets as `{"error": {message, type, param, code}}` with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.type = type_
        self.param = param
        self.retry_after = retry_after

    def body(self) -> dict:
        """The OpenAI error object."""
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> web.Response:
        """The HTTP response carrying this error."""
        headers = {}
        if self.retry_after is not None:
            headers["Retry-After"] = str(
                max(1, round(self.retry_after + 0.499))
            )  # whole seconds, up
        return web.Response(
            status=self.status,
            body=json.dumps(self.body()).encode(),
            content_type="application/json",
            headers=headers,
        )


def sse_error_event(message: str, code: str) -> bytes:
    """A stream's final error event, so a failure after the first byte is never a silent cut."""
    error = error_body(message, "server_error", code=code)
    return b"data: " + json.dumps(error).encode() + b"\n\ndata: [DONE]\n\n"
