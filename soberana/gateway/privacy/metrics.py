"""Privacy metrics, registered in the gateway's own registry. Labels never carry a value."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from soberana.gateway.metrics import declare

# Seconds: the regex/checksum set takes ~0.1-3 ms on a chat request; NER takes tens of ms.
_DETECTOR_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)


class PrivacyMetrics:
    """The privacy layer's counters, in the gateway's registry (one declaration shape)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.redactions = declare(
            r, Counter, "pii_redactions",
            "Distinct PII values replaced by a placeholder, by entity type.",
            ("tenant", "entity_type"))
        self.blocks = declare(
            r, Counter, "privacy_blocks",
            "Requests or answers blocked by the privacy layer (pii_detected, detector_error, "
            "detector_timeout, guardrail_input, guardrail_output, guardrail_error).",
            ("tenant", "reason"))
        self.detector_latency = declare(
            r, Histogram, "pii_detector_latency_seconds",
            "Time to scan one request for PII (failed scans included).",
            buckets=_DETECTOR_BUCKETS)
        self.guardrail_verdicts = declare(
            r, Counter, "guardrail_verdicts",
            "Guardrail verdicts (check: input or output; result: pass, flagged, error).",
            ("tenant", "check", "result"))
        self.audit_last_seq = declare(
            r, Gauge, "audit_last_seq",
            "Sequence number of the last audit record queued (compare with `audit verify`).")
