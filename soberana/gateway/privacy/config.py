"""Privacy settings of gateway.yaml as dataclasses, and their parsing (called by config_loader).

Per tenant and per model (route): `pii:` and `guardrails:`. Top level: `privacy:` (detector
limits, custom recognizers, NER pipelines, the guard model) and `audit:`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from soberana.gateway.privacy.recognizers import ENTITY_TYPES, VALIDATORS

PII_ACTIONS = ("off", "redact", "block")  # in order of strictness
PII_WHEN = ("external", "always")
DETECTOR_ERROR_ACTIONS = ("block", "onprem")
NER_MODES = ("off", "auto", "required")  # in order of strictness
GUARD_ACTIONS = ("off", "log", "flag", "block")  # in order of strictness
GUARD_ENGINES = ("rules", "model")
FSYNC_POLICIES = ("always", "interval", "never")


@dataclass(frozen=True)
class PiiPolicy:
    """What to do with personal data in a request (per tenant, per model; the stricter wins)."""

    action: str = "redact"
    entities: tuple[str, ...] | None = None  # None: every type the detector knows
    when: str = "external"  # external: only for requests sent to a non-onprem backend
    on_detector_error: str = "block"  # block, or route to onprem backends only
    # Names, places, organisations: `auto` with the NER pipelines the gateway loaded (the
    # checksum set alone if none), `off` never (saves their latency), `required` refuses to
    # screen without one (a detector error: blocked, or onprem only).
    ner: str = "auto"

    def stricter(self, other: PiiPolicy | None) -> PiiPolicy:
        """The combination of two policies that gives away nothing either one protects."""
        if other is None:
            return self
        entities = (
            None
            if self.entities is None or other.entities is None
            else tuple(sorted(set(self.entities) | set(other.entities)))
        )
        return PiiPolicy(
            action=max(self.action, other.action, key=PII_ACTIONS.index),
            entities=entities,
            when="always" if "always" in (self.when, other.when) else "external",
            on_detector_error="block"
            if "block" in (self.on_detector_error, other.on_detector_error)
            else "onprem",
            ner=max(self.ner, other.ner, key=NER_MODES.index),
        )


@dataclass(frozen=True)
class GuardrailPolicy:
    """Per-tenant action for the input (prompt injection / jailbreak) and output checks."""

    input: str = "off"
    output: str = "off"


@dataclass(frozen=True)
class CustomRecognizerConfig:
    name: str  # the entity type, e.g. EMPLOYEE_ID
    pattern: str  # a regex; the named group `value` (if any) is what gets redacted
    validator: str = "none"


@dataclass(frozen=True)
class GuardModelConfig:
    """An OpenAI-compatible on-prem classifier (Llama-Guard style: answers `safe` / `unsafe`)."""

    endpoint: str
    model: str
    timeout_s: float = 2.0
    # Streams with output `block`: characters released per passing check; 0 holds the whole
    # answer until one check of the complete output (see ResponseTransform).
    stream_window_chars: int = 0


@dataclass(frozen=True)
class AuditConfig:
    path: str
    fsync: str = "always"  # always: each record durable before the response; interval; never
    fsync_interval_s: float = 1.0
    rotate_bytes: int = 64 * 1024 * 1024
    hmac_key_env: str | None = None  # environment variable holding the signing key


@dataclass(frozen=True)
class PrivacyConfig:
    """Gateway-wide privacy settings."""

    detector_timeout_s: float = 2.0
    custom_recognizers: tuple[CustomRecognizerConfig, ...] = ()
    ner_models: tuple[str, ...] = ()  # spaCy pipeline packages, e.g. es_core_news_sm
    guard_engine: str = "rules"
    guard_model: GuardModelConfig | None = None
    guard_timeout_s: float = 2.0
    extra_injection_patterns: tuple[str, ...] = ()
    extra_output_patterns: tuple[str, ...] = ()
    audit: AuditConfig | None = None


_ENTITY_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")


def parse_pii(p: Any, node: Any, path: str, custom: tuple[str, ...] = ()) -> PiiPolicy:
    """`pii: {action, entities, when, on_detector_error, ner}` (p is config_loader's _Parser)."""
    items = p.mapping(node, path, {"action", "entities", "when", "on_detector_error", "ner"})
    kwargs: dict[str, Any] = {}
    if "action" in items:
        kwargs["action"] = p.choice(items["action"], f"{path}.action", PII_ACTIONS)
    if "when" in items:
        kwargs["when"] = p.choice(items["when"], f"{path}.when", PII_WHEN)
    if "on_detector_error" in items:
        kwargs["on_detector_error"] = p.choice(
            items["on_detector_error"], f"{path}.on_detector_error", DETECTOR_ERROR_ACTIONS
        )
    if "ner" in items:
        kwargs["ner"] = p.choice(items["ner"], f"{path}.ner", NER_MODES)
    if "entities" in items:
        names = p.str_list(items["entities"], f"{path}.entities")
        for j, name in enumerate(names):
            if name not in ENTITY_TYPES and not _ENTITY_NAME.match(name):
                raise p.error(
                    items["entities"].value[j],
                    f"{path}.entities[{j}]",
                    f"unknown entity type {name!r} (known: {', '.join(ENTITY_TYPES)}, "
                    "or a custom recognizer's name)",
                )
        kwargs["entities"] = names
    return PiiPolicy(**kwargs)


def parse_guardrails(p: Any, node: Any, path: str) -> GuardrailPolicy:
    """`guardrails: {input: block|flag|log|off, output: ...}`."""
    items = p.mapping(node, path, {"input", "output"})
    kwargs = {k: p.choice(v, f"{path}.{k}", GUARD_ACTIONS) for k, v in items.items()}
    return GuardrailPolicy(**kwargs)


def parse_privacy(p: Any, node: Any | None, audit_node: Any | None) -> PrivacyConfig:
    """The top-level `privacy:` and `audit:` sections."""
    audit = _parse_audit(p, audit_node) if audit_node is not None else None
    if node is None:
        return PrivacyConfig(audit=audit)
    allowed = {
        "detector_timeout_s",
        "custom_recognizers",
        "ner_models",
        "guard_engine",
        "guard_model",
        "guard_timeout_s",
        "injection_patterns",
        "output_patterns",
    }
    items = p.mapping(node, "privacy", allowed)
    kwargs: dict[str, Any] = {"audit": audit}
    for key in ("detector_timeout_s", "guard_timeout_s"):
        if key in items:
            kwargs[key] = p.positive(items[key], f"privacy.{key}", float)
    if "ner_models" in items:
        kwargs["ner_models"] = p.str_list(items["ner_models"], "privacy.ner_models")
    if "guard_engine" in items:
        kwargs["guard_engine"] = p.choice(
            items["guard_engine"], "privacy.guard_engine", GUARD_ENGINES
        )
    for key, target in (
        ("injection_patterns", "extra_injection_patterns"),
        ("output_patterns", "extra_output_patterns"),
    ):
        if key in items:
            patterns = p.str_list(items[key], f"privacy.{key}")
            for j, pattern in enumerate(patterns):
                _check_regex(p, items[key].value[j], f"privacy.{key}[{j}]", pattern)
            kwargs[target] = patterns
    if "custom_recognizers" in items:
        kwargs["custom_recognizers"] = _parse_custom(p, items["custom_recognizers"])
    if "guard_model" in items:
        g = p.mapping(
            items["guard_model"],
            "privacy.guard_model",
            {"endpoint", "model", "timeout_s", "stream_window_chars"},
        )
        for required in ("endpoint", "model"):
            if required not in g:
                raise p.error(
                    items["guard_model"],
                    "privacy.guard_model",
                    f"missing required key {required!r}",
                )
        kwargs["guard_model"] = GuardModelConfig(
            endpoint=p.endpoint(g["endpoint"], "privacy.guard_model.endpoint"),
            model=p.scalar(g["model"], "privacy.guard_model.model", str),
            timeout_s=p.positive(g["timeout_s"], "privacy.guard_model.timeout_s", float)
            if "timeout_s" in g
            else 2.0,
            stream_window_chars=p.positive(
                g["stream_window_chars"],
                "privacy.guard_model.stream_window_chars",
                int,
                allow_zero=True,
            )
            if "stream_window_chars" in g
            else 0,
        )
    if kwargs.get("guard_engine") == "model" and "guard_model" not in kwargs:
        raise p.error(node, "privacy.guard_engine", "`model` needs a `privacy.guard_model` section")
    return PrivacyConfig(**kwargs)


def _parse_custom(p: Any, node: Any) -> tuple[CustomRecognizerConfig, ...]:
    if not hasattr(node, "value") or not isinstance(node.value, list):
        raise p.error(node, "privacy.custom_recognizers", "expected a list")
    out = []
    for i, item in enumerate(node.value):
        path = f"privacy.custom_recognizers[{i}]"
        items = p.mapping(item, path, {"name", "pattern", "validator"})
        for required in ("name", "pattern"):
            if required not in items:
                raise p.error(item, path, f"missing required key {required!r}")
        name = p.scalar(items["name"], f"{path}.name", str)
        if not _ENTITY_NAME.match(name):
            raise p.error(
                items["name"],
                f"{path}.name",
                "must be upper-case letters, digits and _ (it names the placeholder)",
            )
        pattern = p.scalar(items["pattern"], f"{path}.pattern", str)
        _check_regex(p, items["pattern"], f"{path}.pattern", pattern)
        validator = (
            p.choice(items["validator"], f"{path}.validator", tuple(VALIDATORS))
            if "validator" in items
            else "none"
        )
        out.append(CustomRecognizerConfig(name, pattern, validator))
    return tuple(out)


def _check_regex(p: Any, node: Any, path: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise p.error(node, path, f"invalid regular expression: {e}") from None


def _parse_audit(p: Any, node: Any) -> AuditConfig:
    items = p.mapping(
        node, "audit", {"path", "fsync", "fsync_interval_s", "rotate_bytes", "hmac_key_env"}
    )
    if "path" not in items:
        raise p.error(node, "audit", "missing required key 'path'")
    kwargs: dict[str, Any] = {"path": p.scalar(items["path"], "audit.path", str)}
    if "fsync" in items:
        kwargs["fsync"] = p.choice(items["fsync"], "audit.fsync", FSYNC_POLICIES)
    if "fsync_interval_s" in items:
        kwargs["fsync_interval_s"] = p.positive(
            items["fsync_interval_s"], "audit.fsync_interval_s", float
        )
    if "rotate_bytes" in items:
        kwargs["rotate_bytes"] = p.positive(items["rotate_bytes"], "audit.rotate_bytes", int)
    if "hmac_key_env" in items:
        import os

        env = p.scalar(items["hmac_key_env"], "audit.hmac_key_env", str)
        if not os.environ.get(env):
            raise p.error(
                items["hmac_key_env"],
                "audit.hmac_key_env",
                f"environment variable {env} is not set",
            )
        kwargs["hmac_key_env"] = env
    return AuditConfig(**kwargs)
