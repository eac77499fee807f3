"""Load and validate gateway.yaml; every error names the offending key and its line."""

from __future__ import annotations

import os
import re
from dataclasses import fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from soberana.gateway.config import (
    CAPABILITIES,
    KINDS,
    POOLS,
    PRIVACY_CLASSES,
    BackendConfig,
    GatewayConfig,
    HealthConfig,
    MetricsConfig,
    ModelRoute,
    RoutingConfig,
    TenantConfig,
    TimeoutConfig,
)
from soberana.gateway.privacy.config import parse_guardrails, parse_pii, parse_privacy

_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_TOP_LEVEL = {"server", "routing", "timeouts", "health", "metrics", "models", "tenants", "privacy",
              "audit"}
_BACKEND_KEYS = {f.name for f in fields(BackendConfig)}
_TENANT_KEYS = {f.name for f in fields(TenantConfig)}
# Zero is meaningful for these: no queueing at all, any waiting request saturates.
_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
_ROUTING_ZERO_OK = frozenset(
    {"queue_threshold", "queue_timeout_s", "max_queued", "max_queued_per_tenant"}
)


class ConfigError(ValueError):
    """A configuration problem, located by file, line and dotted key path."""

    def __init__(self, source: str, node: yaml.Node | None, path: str, message: str) -> None:
        self.line = node.start_mark.line + 1 if node is not None else None
        self.path = path
        where = f"{source}:{self.line}" if self.line is not None else source
        super().__init__(f"{where}: {path}: {message}" if path else f"{where}: {message}")


def load_config(path: str | Path) -> GatewayConfig:
    """Read, validate and return the gateway configuration at `path`."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(str(path), None, "", f"cannot read: {e.strerror}") from None
    return parse_config(text, source=str(path))


def parse_config(text: str, source: str = "<config>") -> GatewayConfig:
    """Validate YAML text and build a `GatewayConfig`."""
    return _Parser(source).document(text)


class _Parser:
    """Walks PyYAML's node tree (which keeps line marks) instead of plain dicts."""

    def __init__(self, source: str) -> None:
        self.source = source
        self._constructor = yaml.SafeLoader("")  # only used to turn scalar nodes into values

    def error(self, node: yaml.Node | None, path: str, message: str) -> ConfigError:
        return ConfigError(self.source, node, path, message)

    # ---- generic node helpers -------------------------------------------------------------

    def mapping(self, node: yaml.Node, path: str, allowed: set[str] | None) -> dict[str, yaml.Node]:
        """A mapping's value nodes by key; `allowed=None` admits any key."""
        if not isinstance(node, yaml.MappingNode):
            raise self.error(node, path, "expected a mapping")
        out: dict[str, yaml.Node] = {}
        for key_node, value_node in node.value:
            key = self.scalar(key_node, path, str)
            key_path = f"{path}.{key}" if path else key
            if allowed is not None and key not in allowed:
                raise self.error(
                    key_node, key_path, f"unknown key (allowed: {', '.join(sorted(allowed))})"
                )
            if key in out:
                raise self.error(key_node, key_path, "duplicate key")
            out[key] = value_node
        return out

    def scalar(self, node: yaml.Node, path: str, kind: type) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            raise self.error(node, path, f"expected {_TYPE_NAMES[kind]}, got a {_node_kind(node)}")
        value = self._constructor.construct_object(node)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if kind is str and isinstance(value, int | float) and not isinstance(value, bool):
            value = str(value)  # `region: 1` or `model: 7` are names, not numbers
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise self.error(node, path, f"expected {_TYPE_NAMES[kind]}, got {value!r}")
        return value

    def positive(self, node: yaml.Node, path: str, kind: type, allow_zero: bool = False) -> Any:
        value = self.scalar(node, path, kind)
        if value < 0 or (value == 0 and not allow_zero):
            raise self.error(node, path, f"must be {'>= 0' if allow_zero else '> 0'}, got {value}")
        return value

    def choice(self, node: yaml.Node, path: str, choices: tuple[str, ...]) -> str:
        value = self.scalar(node, path, str)
        if value not in choices:
            raise self.error(node, path, f"{value!r} is not one of {', '.join(choices)}")
        return value

    def str_list(
        self, node: yaml.Node, path: str, choices: tuple[str, ...] | None = None
    ) -> tuple[str, ...]:
        if not isinstance(node, yaml.SequenceNode):
            raise self.error(node, path, f"expected a list, got a {_node_kind(node)}")
        items = []
        for i, item in enumerate(node.value):
            items.append(
                self.choice(item, f"{path}[{i}]", choices)
                if choices
                else self.scalar(item, f"{path}[{i}]", str)
            )
        return tuple(items)

    def section(
        self, node: yaml.Node | None, path: str, cls: type, allow_zero: frozenset[str] = frozenset()
    ) -> Any:
        """A flat section of numeric settings mapping onto dataclass `cls`'s fields."""
        if node is None:
            return cls()
        types = {f.name: type(f.default) for f in fields(cls)}
        items = self.mapping(node, path, set(types))
        kwargs = {
            key: self.scalar(value, f"{path}.{key}", bool)
            if types[key] is bool
            else self.positive(value, f"{path}.{key}", types[key], allow_zero=key in allow_zero)
            for key, value in items.items()
        }
        return cls(**kwargs)

    # ---- the document ---------------------------------------------------------------------

    def document(self, text: str) -> GatewayConfig:
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark
            line = f":{mark.line + 1}" if mark is not None else ""
            raise ConfigError(
                f"{self.source}{line}", None, "", f"invalid YAML: {e.problem}"
            ) from None
        if root is None:
            raise self.error(None, "", "the file is empty; it needs `models` and `tenants`")
        top = self.mapping(root, "", _TOP_LEVEL)
        for required in ("models", "tenants"):
            if required not in top:
                raise self.error(root, "", f"missing required key {required!r}")
        host, port = self.server(top.get("server"))
        models = self.models(top["models"])
        tenants = self.tenants(top["tenants"], models)
        return GatewayConfig(
            models=models,
            tenants=tenants,
            routing=self.routing(top.get("routing")),
            timeouts=self.section(top.get("timeouts"), "timeouts", TimeoutConfig),
            health=self.health(top.get("health")),
            metrics=self.metrics(top.get("metrics")),
            host=host,
            port=port,
            privacy=parse_privacy(self, top.get("privacy"), top.get("audit")),
        )

    def server(self, node: yaml.Node | None) -> tuple[str, int]:
        if node is None:
            return "127.0.0.1", 8080
        items = self.mapping(node, "server", {"host", "port"})
        host = self.scalar(items["host"], "server.host", str) if "host" in items else "127.0.0.1"
        port = 8080
        if "port" in items:
            port = self.scalar(items["port"], "server.port", int)
            if not 0 <= port <= 65535:
                raise self.error(items["port"], "server.port", f"must be 0..65535, got {port}")
        return host, port

    def routing(self, node: yaml.Node | None) -> RoutingConfig:
        cfg = self.section(node, "routing", RoutingConfig, _ROUTING_ZERO_OK)
        if cfg.affinity_load_factor < 1.0:
            key_node = next(k for k, _ in node.value if k.value == "affinity_load_factor")
            raise self.error(key_node, "routing.affinity_load_factor", "must be >= 1.0")
        return cfg

    def health(self, node: yaml.Node | None) -> HealthConfig:
        return self.section(node, "health", HealthConfig)

    def metrics(self, node: yaml.Node | None) -> MetricsConfig:
        if node is None:
            return MetricsConfig()
        items = self.mapping(node, "metrics", {"api_key_sha256", "tenant_labels"})
        kwargs: dict[str, Any] = {}
        if "api_key_sha256" in items:
            kwargs["api_key_sha256"] = self.digests(
                items["api_key_sha256"], "metrics.api_key_sha256"
            )
        if "tenant_labels" in items:
            kwargs["tenant_labels"] = self.scalar(
                items["tenant_labels"], "metrics.tenant_labels", bool
            )
        return MetricsConfig(**kwargs)

    def digests(self, node: yaml.Node, path: str) -> tuple[str, ...]:
        """A list of sha256 hex digests of API keys (never the keys themselves)."""
        digests = self.str_list(node, path)
        for j, digest in enumerate(digests):
            if not _SHA256_HEX.match(digest):
                raise self.error(
                    node.value[j],
                    f"{path}[{j}]",
                    "expected a 64-character lower-case sha256 hex digest "
                    "(make one with `soberana gateway --hash-key`)",
                )
        return digests

    def models(self, node: yaml.Node) -> dict[str, ModelRoute]:
        if not isinstance(node, yaml.MappingNode) or not node.value:
            raise self.error(node, "models", "expected a non-empty mapping of public model names")
        models = {}
        for name, model_node in self.mapping(node, "models", None).items():
            path = f"models.{name}"
            items = self.mapping(model_node, path, {"backends", "pii"})
            if "backends" not in items:
                raise self.error(model_node, path, "missing required key 'backends'")
            seq = items["backends"]
            if not isinstance(seq, yaml.SequenceNode) or not seq.value:
                raise self.error(seq, f"{path}.backends", "expected a non-empty list of backends")
            backends = [
                self.backend(b, f"{path}.backends[{i}]", f"backend-{i}")
                for i, b in enumerate(seq.value)
            ]
            seen: dict[str, int] = {}
            for i, backend in enumerate(backends):
                if backend.name in seen:
                    raise self.error(
                        seq.value[i],
                        f"{path}.backends[{i}].name",
                        f"backend name {backend.name!r} is already used by backends[{seen[backend.name]}]"
                        " (give each backend a distinct `name`)",
                    )
                seen[backend.name] = i
            pii = parse_pii(self, items["pii"], f"{path}.pii") if "pii" in items else None
            models[name] = ModelRoute(name=name, backends=tuple(backends), pii=pii)
        return models

    def backend(self, node: yaml.Node, path: str, default_name: str) -> BackendConfig:
        items = self.mapping(node, path, _BACKEND_KEYS)
        for required in ("endpoint", "kind", "model"):
            if required not in items:
                raise self.error(node, path, f"missing required key {required!r}")
        if "privacy" not in items:
            # Fail closed: guessing `onprem` would send onprem-only tenants' prompts to
            # whatever this endpoint is, e.g. a cloud API.
            raise self.error(
                node,
                path,
                "missing required key 'privacy': declare who can read the prompts it receives "
                "(onprem: infrastructure you operate; external: a third party such as a cloud API)",
            )
        # The default name is positional, never the endpoint: names reach clients (the
        # X-Gateway-Backend header) and metrics, and must not reveal internal addresses.
        kwargs: dict[str, Any] = {
            "endpoint": self.endpoint(items["endpoint"], f"{path}.endpoint"),
            "kind": self.choice(items["kind"], f"{path}.kind", KINDS),
            "model": self.scalar(items["model"], f"{path}.model", str),
            "privacy": self.choice(items["privacy"], f"{path}.privacy", PRIVACY_CLASSES),
            "name": default_name,
        }
        for key in ("name", "hardware", "region"):
            if key in items:
                kwargs[key] = self.scalar(items[key], f"{path}.{key}", str)
        if "api_key_env" in items:
            env = self.scalar(items["api_key_env"], f"{path}.api_key_env", str)
            if not os.environ.get(env):
                raise self.error(
                    items["api_key_env"],
                    f"{path}.api_key_env",
                    f"environment variable {env} is not set",
                )
            kwargs["api_key_env"] = env
        if "capabilities" in items:
            caps = self.str_list(items["capabilities"], f"{path}.capabilities", CAPABILITIES)
            if not caps:
                raise self.error(items["capabilities"], f"{path}.capabilities", "must not be empty")
            kwargs["capabilities"] = caps
        if "pool" in items:
            kwargs["pool"] = self.choice(items["pool"], f"{path}.pool", POOLS)
        for key in ("max_concurrency", "context_window"):
            if key in items:
                kwargs[key] = self.positive(items[key], f"{path}.{key}", int)
        if "weight" in items:
            kwargs["weight"] = self.positive(items["weight"], f"{path}.weight", float)
        return BackendConfig(**kwargs)

    def endpoint(self, node: yaml.Node, path: str) -> str:
        url = self.scalar(node, path, str).rstrip("/")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise self.error(node, path, f"expected an http(s):// URL, got {url!r}")
        # Backends are written with or without the /v1 suffix; requests add it back.
        return url[: -len("/v1")] if url.endswith("/v1") else url

    def tenants(self, node: yaml.Node, models: dict[str, ModelRoute]) -> tuple[TenantConfig, ...]:
        if not isinstance(node, yaml.SequenceNode) or not node.value:
            raise self.error(node, "tenants", "expected a non-empty list of tenants")
        tenants: list[TenantConfig] = []
        key_owner: dict[str, str] = {}
        for i, tenant_node in enumerate(node.value):
            path = f"tenants[{i}]"
            tenant = self.tenant(tenant_node, path, models)
            if any(t.name == tenant.name for t in tenants):
                raise self.error(
                    tenant_node, f"{path}.name", f"tenant {tenant.name!r} is defined twice"
                )
            for digest in tenant.key_sha256:
                if digest in key_owner:
                    raise self.error(
                        tenant_node,
                        f"{path}.key_sha256",
                        f"a key hash is also used by tenant {key_owner[digest]!r}",
                    )
                key_owner[digest] = tenant.name
            tenants.append(tenant)
        return tuple(tenants)

    def tenant(self, node: yaml.Node, path: str, models: dict[str, ModelRoute]) -> TenantConfig:
        items = self.mapping(node, path, _TENANT_KEYS)
        for required in ("name", "key_sha256"):
            if required not in items:
                raise self.error(node, path, f"missing required key {required!r}")
        digests = self.digests(items["key_sha256"], f"{path}.key_sha256")
        kwargs: dict[str, Any] = {
            "name": self.scalar(items["name"], f"{path}.name", str),
            "key_sha256": digests,
        }
        if "models" in items:
            names = self.str_list(items["models"], f"{path}.models")
            for j, model in enumerate(names):
                if model not in models:
                    raise self.error(
                        items["models"].value[j], f"{path}.models[{j}]", f"unknown model {model!r}"
                    )
            kwargs["models"] = names
        if "privacy" in items:
            kwargs["privacy"] = self.str_list(items["privacy"], f"{path}.privacy", PRIVACY_CLASSES)
        for key in ("region", "cache_salt"):
            if key in items:
                kwargs[key] = self.scalar(items[key], f"{path}.{key}", str)
        for key in ("requests_per_minute", "tokens_per_minute", "max_concurrency"):
            if key in items:
                kwargs[key] = self.positive(items[key], f"{path}.{key}", int)
        if "weight" in items:
            kwargs["weight"] = self.positive(items["weight"], f"{path}.weight", float)
        if "pii" in items:  # privacy hook (issue 22)
            kwargs["pii"] = parse_pii(self, items["pii"], f"{path}.pii")
        if "guardrails" in items:
            kwargs["guardrails"] = parse_guardrails(self, items["guardrails"], f"{path}.guardrails")
        return TenantConfig(**kwargs)


def _node_kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "mapping"
    if isinstance(node, yaml.SequenceNode):
        return "list"
    return "scalar"
