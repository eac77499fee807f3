"""The gateway's HTTP surface: routes, request ids, OpenAI-shaped errors for everything."""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from soberana.gateway.errors import GatewayError
from soberana.gateway.metrics import GatewayMetrics
from soberana.gateway.privacy.layer import PrivacyLayer
from soberana.gateway.proxy import Proxy
from soberana.gateway.request_info import ENDPOINT_CAPABILITY
from soberana.gateway.tenants import bearer_key_hash
from soberana.gateway.tracing import trace_middleware
from soberana.tracing import Tracing

log = logging.getLogger("soberana.gateway")

MAX_BODY_BYTES = 64 * 1024 * 1024  # long-context prompts and embedding batches are large
_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def build_app(proxy: Proxy, metrics: GatewayMetrics, tracing: Tracing | None = None) -> web.Application:
    """The aiohttp application serving the OpenAI API in front of the fleet."""
    app = web.Application(
        middlewares=[_envelope(metrics, proxy.privacy), trace_middleware(tracing)],
        client_max_size=MAX_BODY_BYTES,
    )
    for path in ENDPOINT_CAPABILITY:
        app.router.add_post(path, proxy.handle)
    routes = _Routes(proxy, metrics)
    app.router.add_get("/v1/models", routes.list_models)
    app.router.add_get("/v1/models/{model:.+}", routes.get_model)
    app.router.add_get("/health", routes.health)
    app.router.add_get("/metrics", routes.prometheus)
    return app


def _envelope(metrics: GatewayMetrics, privacy: PrivacyLayer):
    """Middleware: a request id on every response, every error in the OpenAI shape, and an
    audit record for every refused request the inference path did not record itself."""

    @web.middleware
    async def envelope(request: web.Request, handler: _Handler) -> web.StreamResponse:
        client_id = request.headers.get("X-Request-Id")
        request_id = (
            client_id if client_id and _CLIENT_REQUEST_ID.match(client_id) else uuid.uuid4().hex
        )
        request["request_id"] = request_id
        code = None
        try:
            response = await handler(request)
        except GatewayError as e:
            response, code = e.response(), e.code
        except web.HTTPException as e:  # aiohttp's own: unknown path, wrong method, body too large
            error = _aiohttp_error(request, e)
            response, code = error.response(), error.code
            if "Allow" in e.headers:
                response.headers["Allow"] = e.headers["Allow"]
        except Exception:
            log.exception("request %s failed inside the gateway", request_id)
            code = "internal_error"
            response = GatewayError(
                500, "internal gateway error", code, type_="server_error"
            ).response()
        if response.status >= 400 and not request.get("audited") and request.path != "/health":
            # Refused outside the inference path (a bad key on /v1/models or /metrics, an
            # unknown path): audited too, so failed authentication leaves a trace. /health's
            # 503 is a state, not a refusal.
            privacy.audit_rejected(request_id, request.method, request.path, response.status, code)
        if not response.prepared:
            response.headers["X-Request-Id"] = request_id
        metrics.responses.labels(request.get("model", ""), str(response.status)).inc()
        return response

    return envelope


def _aiohttp_error(request: web.Request, e: web.HTTPException) -> GatewayError:
    if e.status == 404:
        return GatewayError(404, f"no such endpoint: {request.method} {request.path}", "not_found")
    if e.status == 405:
        return GatewayError(
            405, f"{request.method} is not allowed on {request.path}", "method_not_allowed"
        )
    if e.status == 413:
        return GatewayError(413, e.text, "request_too_large")
    return GatewayError(e.status, e.text or e.reason, "invalid_request")


class _Routes:
    """The small endpoints beside the inference path."""

    def __init__(self, proxy: Proxy, metrics: GatewayMetrics) -> None:
        self.proxy = proxy
        self.metrics = metrics
        self.created = int(time.time())

    def _visible_models(self, request: web.Request) -> list[str]:
        fleet = self.proxy.fleet
        tenant = fleet.tenants.authenticate(request.headers.get("Authorization"))
        privacy = tenant.config.privacy
        return [
            name
            for name, backends in fleet.backends.items()
            if tenant.may_use(name) and any(b.config.privacy in privacy for b in backends)
        ]

    def _model_object(self, name: str) -> dict:
        return {
            "id": name,
            "object": "model",
            "created": self.created,
            "owned_by": "soberana-gateway",
        }

    async def list_models(self, request: web.Request) -> web.Response:
        """The models this tenant may use."""
        data = [self._model_object(name) for name in self._visible_models(request)]
        return web.json_response({"object": "list", "data": data})

    async def get_model(self, request: web.Request) -> web.Response:
        """One model, if this tenant may use it."""
        name = request.match_info["model"]
        if name not in self._visible_models(request):
            raise GatewayError(
                404, f"the model {name!r} does not exist", "model_not_found", param="model"
            )
        return web.json_response(self._model_object(name))

    async def health(self, request: web.Request) -> web.Response:
        """200 while some backend can take traffic; 503 when none can (a load balancer in
        front then sends clients to another gateway), with the counts either way."""
        backends = self.proxy.fleet.all_backends()
        now = time.monotonic()
        usable = sum(1 for b in backends if b.available(now))
        return web.json_response(
            {"status": "ok" if usable else "no_backend_available", "backends": len(backends),
             "backends_available": usable},
            status=200 if usable else 503,
        )

    async def prometheus(self, request: web.Request) -> web.Response:
        """Prometheus text exposition; needs a metrics key when `metrics.api_key_sha256` is set."""
        allowed = self.proxy.fleet.config.metrics.api_key_sha256
        if allowed:
            # Only a metrics key opens this page: tenants' keys never do, since the page shows
            # the whole fleet (backends, hardware, every tenant's traffic).
            if bearer_key_hash(request.headers.get("Authorization")) not in allowed:
                raise GatewayError(
                    401,
                    "/metrics needs the metrics API key: send it as `Authorization: Bearer <key>`",
                    "invalid_api_key",
                )
        response = web.Response(body=generate_latest(self.metrics.registry))
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response
