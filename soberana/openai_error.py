"""The one shape of an OpenAI error body, for the server, the gateway and the bench's endpoint.

`{"error": {"message", "type", "param", "code"}}` is what OpenAI clients parse (the `openai`
package raises `APIStatusError` with `.body["error"]`); framework-free so torch-free hosts
(gateway, bench) share it.
"""

from __future__ import annotations


def error_body(message: str, type: str, param: str | None = None, code: str | int | None = None
               ) -> dict:  # fmt: skip
    """The JSON body of a failed request, or of an error event inside a stream."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_type(status: int) -> str:
    """OpenAI's error type for an HTTP status."""
    if status == 401:
        return "authentication_error"
    if status == 404:
        return "not_found_error"
    if status == 429:
        return "rate_limit_error"
    if status == 503:
        return "service_unavailable"
    if status >= 500:
        return "internal_server_error"
    return "invalid_request_error"
