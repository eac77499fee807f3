"""The privacy layer the proxy calls: screen a request, redact per backend, transform the answer, audit.

Decisions fail closed. A request that should be redacted for an external backend goes there
only in its redacted form; if detection fails or times out it is blocked (or, with
`on_detector_error: onprem`, kept on onprem backends), never sent out as it came.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from datetime import UTC, datetime
from typing import Any

import aiohttp

from soberana.gateway.backend import BackendState
from soberana.gateway.config import GatewayConfig
from soberana.gateway.errors import GatewayError
from soberana.gateway.privacy.audit import AuditLog
from soberana.gateway.privacy.config import GuardrailPolicy, PiiPolicy, PrivacyConfig
from soberana.gateway.privacy.detector import Detector, DetectorError
from soberana.gateway.privacy.guardrails import Guardrails, Verdict
from soberana.gateway.privacy.metrics import PrivacyMetrics
from soberana.gateway.privacy.recognizers import custom_recognizer
from soberana.gateway.privacy.redactor import Redaction, collect_texts, redact_body
from soberana.gateway.privacy.rehydrator import Rehydrator
from soberana.gateway.privacy.response import ResponseTransform
from soberana.gateway.tenants import TenantState

log = logging.getLogger("soberana.gateway.privacy")

_NO_GUARDRAILS = GuardrailPolicy()


class PrivacyLayer:
    """Gateway-wide privacy state: the detector, guardrails and audit log of the current config."""

    def __init__(self, metrics: PrivacyMetrics, session: aiohttp.ClientSession | None) -> None:
        self.metrics = metrics
        self.session = session  # for the guard model
        self.config: PrivacyConfig | None = None
        self.detector: Detector | None = None
        self.guardrails: Guardrails | None = None
        self.audit: AuditLog | None = None
        self._completing: set[asyncio.Task] = set()

    def configure(self, config: PrivacyConfig) -> None:
        """(Re)build from a config; a reload that keeps the audit settings keeps the open log."""
        if config is self.config:
            return
        custom = [
            custom_recognizer(c.name, c.pattern, c.validator) for c in config.custom_recognizers
        ]
        self.detector = Detector(custom, config.ner_models)
        self.guardrails = Guardrails(config, self.session)
        old = self.config.audit if self.config is not None else None
        if config.audit != old:
            if self.audit is not None:
                self.audit.close()
            self.audit = _open_audit(config) if config.audit is not None else None
        self.config = config

    async def complete(self, request: RequestPrivacy, status: int, exchange: Any) -> None:
        """After an answer was sent: the stream output verdicts, then the audit record. Runs to
        the end even if the caller is cancelled (a client that closes right after `[DONE]`)."""

        async def run() -> None:
            await request.finish_streams()
            request.finish(status, None, exchange.usage, exchange.stream_failure is not None)

        task = asyncio.ensure_future(run())
        self._completing.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._completing.discard)
        await asyncio.shield(task)

    def audit_rejected(
        self, request_id: str, method: str, path: str, status: int, code: str | None
    ) -> None:
        """One record for a request refused before any tenant was known or any model chosen
        (a bad key on /v1/models or /metrics, an unknown path, a wrong method)."""
        if self.audit is None:
            return
        record = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "request_id": request_id,
            "tenant": None,
            "method": method,
            "path": path,
            "status": status,
            "error": code,
        }
        self.audit.write(record)
        self.metrics.audit_last_seq.inc()

    def begin(self, config: GatewayConfig, request_id: str, path: str) -> RequestPrivacy:
        """The privacy state of one request (call `identify` once the tenant and model are known)."""
        self.configure(config.privacy)
        return RequestPrivacy(self, config, request_id, path)

    def close(self) -> None:
        if self.audit is not None:
            self.audit.close()


class RequestPrivacy:
    """One request's policy, placeholder mapping, verdicts and audit record."""

    def __init__(
        self, layer: PrivacyLayer, config: GatewayConfig, request_id: str, path: str
    ) -> None:
        self.layer = layer
        self.config = config
        self.request_id = request_id
        self.path = path
        self.started = time.time()
        self.tenant: TenantState | None = None
        self.model = ""
        self.policy = PiiPolicy(action="off")
        self.guard = _NO_GUARDRAILS
        self.redaction: Redaction | None = None  # the mapping: this request only, never logged
        self.redacted_body: dict[str, Any] | None = None
        self.onprem_only = False  # detection failed or PII found with action block
        self.detector_result = "skipped"  # skipped | ok | error | timeout
        self.verdicts: list[Verdict] = []
        self.backend: BackendState | None = None
        self.transforms: list[ResponseTransform] = []

    def identify(self, tenant: TenantState, model: str) -> None:
        """The tenant's and the route's policies; the stricter of the two applies."""
        self.tenant, self.model = tenant, model
        route = self.config.models[model].pii
        self.policy = (tenant.config.pii or PiiPolicy()).stricter(route)
        self.guard = tenant.config.guardrails or _NO_GUARDRAILS

    async def screen(
        self, body: dict[str, Any], candidates: list[BackendState]
    ) -> list[BackendState]:
        """Input guardrail and PII detection; the candidates the request may still go to."""
        if self.guard.input != "off":
            verdict = await self.layer.guardrails.check("input", "\n".join(collect_texts(body)))
            self._verdict(verdict)
            if self.guard.input == "block" and verdict.result != "pass":
                reason = "guardrail_input" if verdict.result == "flagged" else "guardrail_error"
                raise self._block(
                    reason,
                    400 if verdict.result == "flagged" else 503,
                    f"the request was blocked by the input guardrail ({verdict.result}: {verdict.rule})",
                    "input_guardrail_blocked",
                )
        policy = self.policy
        if policy.action == "off":
            return candidates
        external = [b for b in candidates if b.config.privacy != "onprem"]
        if policy.when == "external" and not external:
            return candidates  # the request stays on site: nothing to protect it from
        entities = frozenset(policy.entities) if policy.entities is not None else None
        started = time.perf_counter()
        try:
            self.redacted_body, self.redaction = await redact_body(
                body,
                self.layer.detector,
                entities,
                self.layer.config.detector_timeout_s,
                policy.ner,
            )
            self.detector_result = "ok"
        except DetectorError as e:
            self.detector_result = "timeout" if "longer than" in str(e) else "error"
            return self._detector_failed(candidates, str(e))
        finally:
            self.layer.metrics.detector_latency.observe(time.perf_counter() - started)
        found = self.redaction.counts
        if policy.action == "redact":
            for kind, n in found.items():
                self.layer.metrics.redactions.labels(self.tenant.metrics_label, kind).inc(n)
            return candidates
        if not found:
            return candidates
        # action block: personal data may not leave (when: external) or not pass at all (always)
        onprem = [b for b in candidates if b.config.privacy == "onprem"]
        if policy.when == "always" or not onprem:
            raise self._block(
                "pii_detected",
                400,
                "the request contains personal data this tenant may not send "
                f"({', '.join(sorted(found))}); remove it or use an on-prem model",
                "pii_detected",
            )
        self.onprem_only = True
        return onprem

    def body_for(self, backend: BackendState, body: dict[str, Any]) -> dict[str, Any]:
        """The body this backend may receive: redacted wherever the policy says so."""
        self.backend = backend
        leaves = backend.config.privacy != "onprem"
        if self.policy.action == "off" or (self.policy.when == "external" and not leaves):
            return body
        if leaves and self.onprem_only:
            raise GatewayError(
                500, "privacy invariant violated", "internal_error", type_="server_error"
            )
        if self.redacted_body is None:
            # Unreachable by construction (screen ran over these candidates); fail closed anyway.
            raise GatewayError(
                503,
                "the request was not screened for personal data",
                "pii_not_screened",
                type_="server_error",
            )
        return self.redacted_body

    def response_transform(self, backend: BackendState) -> ResponseTransform | None:
        """How this attempt's answer must be changed: rehydrated and/or output-checked."""
        rehydrate = (
            self.redaction is not None
            and bool(self.redaction.by_placeholder)
            and (self.policy.when == "always" or backend.config.privacy != "onprem")
        )
        if not rehydrate and self.guard.output == "off":
            return None
        guardrails = self.layer.guardrails
        transform = ResponseTransform(
            Rehydrator(self.redaction.by_placeholder) if rehydrate else None,
            self.guard.output,
            guardrails.rules if guardrails.model is None else None,
            guardrails.model.check if guardrails.model is not None else None,
            self._output_verdict,
            guardrails.model.config.stream_window_chars if guardrails.model is not None else 0,
        )
        self.transforms.append(transform)
        return transform

    def finish(
        self, status: int, code: str | None, usage: Any, stream_failed: bool = False
    ) -> None:
        """Write the request's audit record (counts by type, verdicts; never a value)."""
        audit = self.layer.audit
        if audit is None:
            return
        b = self.backend
        record = {
            "time": datetime.fromtimestamp(self.started, UTC).isoformat(timespec="milliseconds"),
            "request_id": self.request_id,
            "tenant": self.tenant.config.name if self.tenant else None,
            "model": self.model,
            "path": self.path,
            "backend": b.name if b else None,
            "pool": b.config.pool if b else None,
            "privacy_class": b.config.privacy if b else None,
            "status": status,
            "error": code or ("stream_interrupted" if stream_failed else None),
            "pii": {
                "action": self.policy.action,
                "detector": self.detector_result,
                "entities": dict(sorted(self.redaction.counts.items())) if self.redaction else {},
                "redacted_for_backend": b is not None
                and self.redaction is not None
                and (self.policy.when == "always" or b.config.privacy != "onprem"),
            },
            "guardrails": [v.as_record() for v in self.verdicts],
            "usage": {
                "prompt_tokens": getattr(usage, "prompt_tokens", 0),
                "completion_tokens": getattr(usage, "completion_tokens", 0),
            },
            "duration_ms": round((time.time() - self.started) * 1000, 1),
        }
        audit.write(record)
        self.layer.metrics.audit_last_seq.inc()

    async def finish_streams(self) -> None:
        for t in self.transforms:
            await t.finish_stream()

    # ---- helpers ---------------------------------------------------------------------------

    def _detector_failed(self, candidates: list[BackendState], why: str) -> list[BackendState]:
        reason = "detector_timeout" if self.detector_result == "timeout" else "detector_error"
        onprem = [b for b in candidates if b.config.privacy == "onprem"]
        if self.policy.on_detector_error == "onprem" and self.policy.when == "external" and onprem:
            self.onprem_only = True
            self.layer.metrics.blocks.labels(self.tenant.metrics_label, reason + "_onprem").inc()
            return onprem
        raise self._block(
            reason,
            503,
            f"the request could not be screened for personal data ({why}); it was not sent",
            "pii_detector_unavailable",
        )

    def _block(self, reason: str, status: int, message: str, code: str) -> GatewayError:
        self.layer.metrics.blocks.labels(self.tenant.metrics_label, reason).inc()
        type_ = "server_error" if status >= 500 else "guardrail_error"
        return GatewayError(status, message, code, type_=type_)

    def _verdict(self, verdict: Verdict) -> None:
        self.verdicts.append(verdict)
        self.layer.metrics.guardrail_verdicts.labels(
            self.tenant.metrics_label, verdict.check, verdict.result
        ).inc()
        action = self.guard.input if verdict.check == "input" else self.guard.output
        if verdict.result != "pass" and action in ("flag", "block"):
            log.warning(
                "request %s: %s guardrail %s (%s)",
                self.request_id,
                verdict.check,
                verdict.result,
                verdict.rule,
            )

    def _output_verdict(self, verdict: Verdict) -> None:
        self._verdict(verdict)
        if self.guard.output == "block" and verdict.result != "pass":
            self.layer.metrics.blocks.labels(self.tenant.metrics_label, "guardrail_output").inc()


def _open_audit(config: PrivacyConfig) -> AuditLog:
    a = config.audit
    key = os.environ[a.hmac_key_env].encode() if a.hmac_key_env else None
    return AuditLog(a.path, a.fsync, a.fsync_interval_s, a.rotate_bytes, key)
