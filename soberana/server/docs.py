"""/docs with Swagger UI served from this server (no CDN: works air-gapped, leaks no request),
and an OpenAPI document that says what the server does (400 where FastAPI would say 422)."""

from __future__ import annotations

from importlib.resources import files
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from soberana.server import responses

ASSETS_URL = "/docs/assets"
_EXTRA_SCHEMAS = (responses.ChatCompletionChunk,)


def install_docs(app: FastAPI) -> None:
    """Serve Swagger UI at /docs with the assets of the `fastapi-offline` package."""
    assets = files("fastapi_offline") / "static"
    app.mount(ASSETS_URL, StaticFiles(directory=str(assets)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} API",
            swagger_js_url=f"{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS_URL}/favicon.png",
        )

    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _as_served(generate())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _as_served(schema: dict[str, Any]) -> dict[str, Any]:
    """Drop FastAPI's 422 (validation errors are 400 `ErrorResponse`s here)."""
    for path_item in schema.get("paths", {}).values():
        for operation in path_item.values():
            operation.get("responses", {}).pop("422", None)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    for model in _EXTRA_SCHEMAS:
        definition = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(definition.pop("$defs", {}))
        components[model.__name__] = definition
    return schema
