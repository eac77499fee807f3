"""The gateway's privacy layer: PII redaction and rehydration, guardrails, the audit log.

Everything runs in the gateway process. `layer.PrivacyLayer` is the one object the proxy
talks to; the other modules each hold one concept (recognizers, the detector, the redactor,
the rehydrator, guardrails, the audit log, their config).
"""
