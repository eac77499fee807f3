"""Tenants of one server: who sent a request, and the KV cache salt that keeps tenants apart.

A tenant is named by its API key (each `--api-key` is one tenant). Behind a front door such
as a gateway, `--tenant-header` names sub-tenants, but only *within* the key's own tenant:
key B sending `X-Tenant-Id: t1` becomes `key:B/t1`, never the `t1` of another key, so holding
a key never lends another key's identity. (`--tenant-header` therefore needs `--api-key`.)

The salt the engine sees is HMAC-SHA256, under the server's salt secret, of the tenant and the
client's own `cache_salt`: two tenants never share KV blocks, a client's salt only subdivides
its tenant's, and nobody without the secret can compute another tenant's salt to probe its
prompts through cache timing.
"""

from __future__ import annotations

import hashlib
import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from soberana.server.errors import OpenAIError
from soberana.tenant_salt import derive_salt

# Open without a key: probes, scrapers and the API description.
_OPEN_PATHS = {"/health", "/metrics", "/version", "/openapi.json", "/docs", "/docs/oauth2-redirect"}
_OPEN_PREFIXES = ("/docs/assets/",)


def tenant_of_key(api_key: str) -> str:
    """A stable tenant name that does not reveal the key."""
    return "key:" + hashlib.sha256(api_key.encode()).hexdigest()[:24]


class TenantMiddleware:
    """Checks `Authorization: Bearer KEY` against the configured keys (401 otherwise) and
    records the request's tenant and the salt secret in `scope["state"]`."""

    def __init__(
        self, app: ASGIApp, api_keys: list[str], tenant_header: str | None, salt_secret: bytes
    ) -> None:
        if tenant_header and not api_keys:
            raise ValueError("--tenant-header needs --api-key: the header only names "
                             "sub-tenants within the tenant of the key that sent it")
        self.app = app
        self.keys = [(k.encode(), tenant_of_key(k)) for k in api_keys]
        self.header = tenant_header.lower().encode() if tenant_header else None
        self.salt_secret = salt_secret

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _is_open(scope["path"]):
            await self.app(scope, receive, send)
            return
        tenant = None
        if self.keys:
            headers = dict(scope["headers"])
            authorization = headers.get(b"authorization", b"")
            if not authorization and headers.get(b"x-api-key"):  # Anthropic's clients send it so
                authorization = b"Bearer " + headers[b"x-api-key"]
            tenant = self._tenant_of(authorization)
            if tenant is None:
                error = OpenAIError(
                    401,
                    "Incorrect or missing API key. Send it as 'Authorization: Bearer KEY'.",
                    type="invalid_request_error",
                    code="invalid_api_key",
                )
                await error.response()(scope, receive, send)
                return
            if self.header is not None and headers.get(self.header):
                tenant += "/" + headers[self.header].decode("latin-1")
        state = scope.setdefault("state", {})
        state["tenant"] = tenant
        state["salt_secret"] = self.salt_secret
        await self.app(scope, receive, send)

    def _tenant_of(self, authorization: bytes) -> str | None:
        scheme, _, given = authorization.partition(b" ")
        if scheme.lower() != b"bearer":  # RFC 7235: the scheme is case-insensitive
            given = b""
        # Compare with every key, constant time each, so timing reveals nothing.
        matches = [t for expected, t in self.keys if hmac.compare_digest(given.strip(), expected)]
        return matches[0] if matches else None


def _is_open(path: str) -> bool:
    return path in _OPEN_PATHS or path.startswith(_OPEN_PREFIXES)


def effective_cache_salt(scope: Scope, requested: str | None) -> str | None:
    """The salt the engine sees (None when neither a tenant nor a client salt is set:
    anonymous requests share the cache).

    `HMAC(tenant)`, then `|HMAC(tenant, client salt)` when the client sent one: the part
    before the `|` names the tenant's KV namespace in shared tiers (soberana.kv.namespace), so
    `soberana kv purge --tenant` reaches every block of the tenant, whatever client salts it used.
    """
    state = scope.get("state", {})
    tenant = state.get("tenant")
    if tenant is None and requested is None:
        return None
    tenant_part = derive_salt(state["salt_secret"], tenant or "")
    if requested is None:
        return tenant_part
    return f"{tenant_part}|{derive_salt(state['salt_secret'], tenant or '', requested)}"
