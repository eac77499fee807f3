"""OpenAI-shaped errors: one exception type and the handlers that render every failure path."""

from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from soberana.openai_error import error_body, error_type

logger = logging.getLogger("soberana.server")

# Union members appear in pydantic's error locations as type names; they are not parameters.
_UNION_TAGS = {"str", "int", "float", "bool"}
_UNION_TAG_PREFIXES = ("list[", "dict[", "function-", "constrained-", "literal[")

# Fields whose type is a union: pydantic reports one error per member, we say it once.
_UNION_DESCRIPTIONS = {
    "prompt": "a string, an array of strings, an array of token ids or an array of such arrays",
    "stop": "a string or an array of strings",
    "content": "a string or an array of content parts",
}


class OpenAIError(Exception):
    """A request failure rendered as `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or error_type(status)
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict:
        """The JSON body OpenAI clients parse."""
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    """A 400 invalid_request_error."""
    return OpenAIError(400, message, param=param, code=code)


def validation_error(errors: list[dict]) -> OpenAIError:
    """Turn pydantic/FastAPI validation errors into one 400 that names the parameter."""
    if not errors:
        return bad_request("Invalid request body")
    first = errors[0]
    if first.get("type") == "invalid_unicode":
        param = (first.get("ctx") or {}).get("param")
        return bad_request(first["msg"], param=param, code="invalid_unicode")
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "could not parse")
        return bad_request(f"Invalid JSON in request body: {detail}", code="invalid_json")
    field = _field_path(first.get("loc", ()))
    if not field:
        if first.get("type") == "missing":
            return bad_request("The request body is empty; send a JSON object")
        return bad_request(
            "The request body must be a JSON object (with Content-Type: application/json)"
        )
    param = ".".join(field)
    same_field = [e for e in errors if _field_path(e.get("loc", ())) == field]
    leaf = field[-1] if field else ""
    if leaf in _UNION_DESCRIPTIONS and len(same_field) > 1:
        message = f"{param}: must be {_UNION_DESCRIPTIONS[leaf]}"
    else:
        message = f"{param}: {first.get('msg', 'invalid value')}"
        if first.get("type") == "extra_forbidden":
            message = f"Unrecognized request argument supplied: {param}"
        elif "input" in first and first["type"] != "missing":
            message += f" (got {_short_repr(first['input'])})"
    return bad_request(message, param=param)


def _field_path(loc: tuple) -> list[str]:
    """The parameter path of an error location, cut at the first union member tag."""
    path = []
    for part in loc:
        text = str(part)
        if text in _UNION_TAGS or text.startswith(_UNION_TAG_PREFIXES):
            break
        if text != "body":
            path.append(text)
    return path


def _short_repr(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def install_error_handlers(app: FastAPI) -> None:
    """Route every failure (ours, FastAPI's 422, unknown routes, bugs) through OpenAIError."""

    @app.exception_handler(OpenAIError)
    async def _openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(list(exc.errors())).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"Unknown request URL: {request.method} {request.url.path}"
            code = "unknown_url"
        elif exc.status_code == 405:
            message = f"Method {request.method} is not allowed for {request.url.path}"
            code = "method_not_allowed"
        else:
            message = str(exc.detail) or HTTPStatus(exc.status_code).phrase
            code = None
        return OpenAIError(exc.status_code, message, code=code, headers=exc.headers).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return OpenAIError(500, f"Internal server error: {type(exc).__name__}").response()
