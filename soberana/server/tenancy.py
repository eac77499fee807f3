"""Tenants of one server: who sent a request, and the KV cache salt that keeps tenants apart.

A tenant is named by its API key (each `--api-key` is one tenant) or, behind a trusted
front door such as `soberana gateway`, by a header (`--tenant-header`). Its name prefixes
every request's `cache_salt`, so two tenants never share KV blocks and cannot probe each
other's prompts through cache timing; a client's own salt only subdivides its tenant's.
"""

from __future__ import annotations

import hashlib
import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from soberana.server.errors import OpenAIError

# Open without a key: probes, scrapers and the API description.
_OPEN_PATHS = {"/health", "/metrics", "/version", "/openapi.json", "/docs", "/docs/oauth2-redirect"}


def tenant_of_key(api_key: str) -> str:
    """A stable tenant name that does not reveal the key."""
    return "key:" + hashlib.sha256(api_key.encode()).hexdigest()[:24]


class TenantMiddleware:
    """Checks `Authorization: Bearer KEY` against the configured keys (401 otherwise) and
    records the request's tenant in `scope["state"]["tenant"]`."""

    def __init__(self, app: ASGIApp, api_keys: list[str], tenant_header: str | None) -> None:
        self.app = app
        self.keys = [(f"Bearer {k}".encode(), tenant_of_key(k)) for k in api_keys]
        self.header = tenant_header.lower().encode() if tenant_header else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in _OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        tenant = None
        if self.keys:
            given = headers.get(b"authorization", b"")
            if not given and headers.get(b"x-api-key"):  # Anthropic's clients send the key so
                given = b"Bearer " + headers[b"x-api-key"]
            # Compare with every key, constant time each, so timing reveals nothing.
            matches = [t for expected, t in self.keys if hmac.compare_digest(given, expected)]
            if not matches:
                error = OpenAIError(
                    401,
                    "Incorrect or missing API key. Send it as 'Authorization: Bearer KEY'.",
                    type="invalid_request_error",
                    code="invalid_api_key",
                )
                await error.response()(scope, receive, send)
                return
            tenant = matches[0]
        if self.header is not None and headers.get(self.header):
            tenant = "hdr:" + headers[self.header].decode("latin-1")
        scope.setdefault("state", {})["tenant"] = tenant
        await self.app(scope, receive, send)


def effective_cache_salt(scope: Scope, requested: str | None) -> str | None:
    """The salt the engine sees: the tenant's name, then the client's own salt."""
    tenant = scope.get("state", {}).get("tenant")
    if tenant is None:
        return requested
    return f"{tenant}|{requested or ''}"
