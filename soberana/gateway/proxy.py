"""The inference path: authenticate, admit, route, forward with failover, account."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from aiohttp import web

from soberana.gateway.backend import BackendState
from soberana.gateway.config import RoutingConfig
from soberana.gateway.errors import GatewayError
from soberana.gateway.fleet import Fleet
from soberana.gateway.metrics import GatewayMetrics
from soberana.gateway.privacy.layer import PrivacyLayer, RequestPrivacy
from soberana.gateway.privacy.metrics import PrivacyMetrics
from soberana.gateway.request_info import RequestNeeds, request_needs
from soberana.gateway.tenants import TenantState
from soberana.gateway.upstream import Exchange, Upstream, UpstreamFailure
from soberana.gateway.waiters import SlotWaiters, Ticket

log = logging.getLogger("soberana.gateway")

_RECHECK_S = 0.5  # a queued request re-checks for a slot at least this often


class Proxy:
    """Handles /v1/chat/completions, /v1/completions and /v1/embeddings."""

    def __init__(self, fleet: Fleet, upstream: Upstream, metrics: GatewayMetrics) -> None:
        self.fleet = fleet  # swapped whole on reload; each request keeps the one it started with
        self.upstream = upstream
        self.metrics = metrics
        self.waiters = SlotWaiters()
        self.privacy = PrivacyLayer(PrivacyMetrics(metrics.registry), upstream.session)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Serve one inference request end to end, with its audit record (privacy, issue 22)."""
        fleet = self.fleet
        guard = self.privacy.begin(fleet.config, request["request_id"], request.path)
        request["audited"] = True  # this request's record is written here, whatever happens
        exchange = Exchange(request_id=request["request_id"], stream=False, strip_usage_event=False)
        try:
            response = await self._handle(request, fleet, guard, exchange)
        except GatewayError as e:
            guard.finish(e.status, e.code, exchange.usage)
            raise
        except web.HTTPException as e:  # aiohttp's own, e.g. a body over the size limit
            guard.finish(e.status, "invalid_request", exchange.usage)
            raise
        except asyncio.CancelledError:  # the client left before its answer was complete
            guard.finish(499, "client_closed_request", exchange.usage)
            raise
        except Exception:
            guard.finish(500, "internal_error", exchange.usage)
            raise
        # The client may close as soon as the stream ends, which cancels this handler: the
        # output verdict and the audit record are finished in a task of their own.
        await self.privacy.complete(guard, response.status, exchange)
        return response

    async def _handle(
        self, request: web.Request, fleet: Fleet, guard: RequestPrivacy, exchange: Exchange
    ) -> web.StreamResponse:
        started = time.perf_counter()
        tenant = fleet.tenants.authenticate(request.headers.get("Authorization"))
        body, size = await _read_json(request)
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise GatewayError(
                400, "`model` is required and must be a string", "missing_model", param="model"
            )
        if model not in fleet.backends or not tenant.may_use(model):
            raise GatewayError(
                404, f"the model {model!r} does not exist", "model_not_found", param="model"
            )
        request["model"] = model
        guard.identify(tenant, model)
        needs = request_needs(
            request.path, body, size, request.headers.get("X-Session-Id"), tenant.cache_salt
        )
        candidates = fleet.router.candidates(model, needs, tenant.config.privacy)
        candidates = await guard.screen(body, candidates)  # privacy hook: guardrail, PII
        try:
            tenant.admit(needs.context_tokens)
        except GatewayError as e:
            self.metrics.rejections.labels(tenant.metrics_label, e.code).inc()
            raise
        self.metrics.tenant_requests.labels(tenant.metrics_label, model).inc()
        exchange.stream = needs.stream
        exchange.privacy = guard
        response = None
        try:
            response = await self._forward(
                request, fleet, tenant, model, body, needs, candidates, exchange
            )
        finally:
            self._account(tenant, model, exchange, needs, served=response is not None)
        added = exchange.ready_at - started - exchange.upstream_s - exchange.queue_s
        self.metrics.added_latency.labels(model).observe(max(0.0, added))
        return response

    def _account(
        self, tenant: TenantState, model: str, exchange: Exchange, needs: RequestNeeds, served: bool
    ) -> None:
        """Release the tenant's slot; count queueing and the tokens a served request used."""
        if exchange.queue_s:
            self.metrics.queue_wait.labels(model).observe(exchange.queue_s)
        usage = exchange.usage
        if not served:
            tenant.finish(0, needs.context_tokens)
            return
        if not usage.reported:
            usage.prompt_tokens = needs.prompt_tokens
        tenant.finish(usage.total, needs.context_tokens)
        tokens = self.metrics.tenant_tokens
        tokens.labels(tenant.metrics_label, model, "prompt").inc(usage.prompt_tokens)
        tokens.labels(tenant.metrics_label, model, "completion").inc(usage.completion_tokens)

    async def _forward(
        self,
        request: web.Request,
        fleet: Fleet,
        tenant: TenantState,
        model: str,
        body: dict[str, Any],
        needs: RequestNeeds,
        candidates: list[BackendState],
        exchange: Exchange,
    ) -> web.StreamResponse:
        routing = fleet.config.routing
        region = request.headers.get("X-Region") or tenant.config.region
        tried: list[BackendState] = []
        failures: list[UpstreamFailure] = []
        queue_deadline: float | None = None
        ticket: Ticket | None = None
        try:
            while len(tried) < routing.max_attempts:
                try:
                    choice = fleet.router.pick(model, candidates, needs, region, tried)
                except GatewayError:
                    if failures:
                        break  # every healthy backend was tried: report what they did
                    raise
                if choice is None:
                    if ticket is None:
                        ticket = self._enqueue(model, tenant, routing)
                        queue_deadline = time.monotonic() + routing.queue_timeout_s
                    await self._wait_for_slot(ticket, tenant, routing, queue_deadline, exchange)
                    continue
                if ticket is not None:
                    self.waiters.leave(ticket, served=True)
                    ticket = None
                backend, overflow = choice
                if tried:
                    self.metrics.retries.labels(model, tried[-1].name).inc()
                try:
                    response = await self._attempt(request, fleet, tenant, body, backend, exchange)
                except UpstreamFailure as failure:
                    tried.append(backend)
                    failures.append(failure)
                    continue
                if overflow:
                    self.metrics.overflows.labels(model, backend.name).inc()
                if tried or (region is not None and backend.config.region != region):
                    self.metrics.failovers.labels(model, backend.name).inc()
                return response
        finally:
            if ticket is not None:  # gave up waiting: a timeout, or the client went away
                self.waiters.leave(ticket, served=False)
        raise _exhausted(model, failures)

    async def _attempt(
        self,
        request: web.Request,
        fleet: Fleet,
        tenant: TenantState,
        body: dict[str, Any],
        backend: BackendState,
        exchange: Exchange,
    ) -> web.StreamResponse:
        """One upstream attempt holding a slot of `backend`; raises UpstreamFailure."""
        model = backend.model
        # privacy hook (issue 22): the body redacted for this backend where the policy says so
        sent = exchange.privacy.body_for(backend, body) if exchange.privacy else body
        payload = _payload(sent, backend, tenant, exchange, request.path)
        self.metrics.requests.labels(model, backend.name).inc()
        backend.outstanding += 1
        waited_before = exchange.upstream_s
        try:
            response = await self.upstream.attempt(
                request, backend, request.path, payload, fleet.config.timeouts, exchange
            )
        except UpstreamFailure as failure:
            log.info(
                "request %s: backend %s/%s failed before answering: %s%s",
                exchange.request_id,
                backend.model,
                backend.name,
                failure.detail,
                f" ({failure.internal})" if failure.internal else "",
            )
            self._record_failure(backend, failure.reason, failure.backend_fault, fleet)
            raise
        finally:
            backend.outstanding -= 1
            self.waiters.wake(model)
        if exchange.stream_failure:
            self._record_failure(backend, exchange.stream_failure, True, fleet)
        else:
            backend.record_success()
        self.metrics.upstream_latency.labels(model, backend.name).observe(
            exchange.upstream_s - waited_before
        )
        self.metrics.upstream_first_byte.labels(model, backend.name).observe(exchange.first_byte_s)
        self.metrics.upstream_total.labels(model, backend.name).observe(exchange.total_s)
        return response

    def _enqueue(self, model: str, tenant: TenantState, routing: RoutingConfig) -> Ticket:
        """A place in `model`'s queue, or a 429 when the queue or the tenant's share is full."""
        why = None
        if self.waiters.count(model) >= routing.max_queued:
            why = f"{routing.max_queued} requests are already queued"
        elif self.waiters.count_tenant(model, tenant.config.name) >= routing.max_queued_per_tenant:
            why = f"you already have {routing.max_queued_per_tenant} requests queued"
        if why is not None:
            self.metrics.rejections.labels(tenant.metrics_label, "queue_full").inc()
            raise _busy(model, why, "queue_full", routing.retry_after_s)
        return self.waiters.enqueue(model, tenant.config.name, tenant.config.weight)

    async def _wait_for_slot(
        self,
        ticket: Ticket,
        tenant: TenantState,
        routing: RoutingConfig,
        deadline: float,
        exchange: Exchange,
    ) -> None:
        """Park until a slot may be free; 429 when the wait runs out."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            self.metrics.rejections.labels(tenant.metrics_label, "queue_timeout").inc()
            why = "no backend slot became free in time"
            raise _busy(ticket.model, why, "queue_timeout", routing.retry_after_s)
        parked = time.perf_counter()
        try:
            await self.waiters.wait(ticket, min(remaining, _RECHECK_S))
        except TimeoutError:
            pass  # re-check anyway: scraped queues can drain without a wake-up
        exchange.queue_s += time.perf_counter() - parked

    def _record_failure(
        self, backend: BackendState, reason: str, backend_fault: bool, fleet: Fleet
    ) -> None:
        self.metrics.errors.labels(backend.model, backend.name, reason).inc()
        health = fleet.config.health
        if backend_fault and backend.record_failure(health):
            self.metrics.ejections.labels(backend.model, backend.name).inc()
            log.warning(
                "backend %s/%s ejected for %.0f s after %d consecutive failed requests (last: %s)",
                backend.model,
                backend.name,
                health.cooldown_s,
                health.eject_after,
                reason,
            )


async def _read_json(request: web.Request) -> tuple[dict[str, Any], int]:
    raw = await request.read()
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise GatewayError(
            400, f"the request body is not valid JSON: {e}", "invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise GatewayError(400, "the request body must be a JSON object", "invalid_json")
    return body, len(raw)


def _payload(
    body: dict[str, Any], backend: BackendState, tenant: TenantState, exchange: Exchange, path: str
) -> bytes:
    """The body as this backend must see it: its model name, the tenant's salt, usage asked for."""
    out = dict(body)
    out["model"] = backend.config.model
    client_salt = out.pop("cache_salt", None)
    if backend.traits.cache_salt and path != "/v1/embeddings":
        # The tenant's salt always leads, so no client can reach another tenant's KV blocks;
        # a client's own salt only splits its tenant's cache further.
        salt = tenant.cache_salt
        if isinstance(client_salt, str) and client_salt:
            salt += ":" + client_salt
        out["cache_salt"] = salt
    options = body.get("stream_options")
    client_wants_usage = isinstance(options, dict) and options.get("include_usage") is True
    # Anthropic's streams (/v1/messages) report usage in their own events: no stream_options.
    exchange.strip_usage_event = (
        exchange.stream
        and backend.traits.stream_usage
        and not client_wants_usage
        and path != "/v1/messages"
    )
    if exchange.strip_usage_event:
        out["stream_options"] = {
            **(options if isinstance(options, dict) else {}),
            "include_usage": True,
        }
    return json.dumps(out, ensure_ascii=False, separators=(",", ":")).encode()


def _busy(model: str, why: str, code: str, retry_after: float) -> GatewayError:
    return GatewayError(
        429,
        f"every backend of model {model!r} you may use is at capacity and {why}; retry later",
        code,
        type_="rate_limit_error",
        retry_after=retry_after,
    )


def _exhausted(model: str, failures: list[UpstreamFailure]) -> GatewayError:
    detail = "; ".join(f.detail for f in failures)
    if all(f.reason == "http_429" for f in failures):
        return GatewayError(
            429,
            f"every backend tried for {model!r} is rate-limiting: {detail}",
            "upstream_rate_limited",
            type_="rate_limit_error",
            retry_after=1,
        )
    return GatewayError(
        502,
        f"{len(failures)} attempt(s) for model {model!r} failed: {detail}",
        "upstream_unavailable",
        type_="server_error",
    )
