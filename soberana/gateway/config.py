"""The gateway's configuration as plain dataclasses (the YAML loader in `config_loader.py` builds them)."""

from __future__ import annotations

from dataclasses import dataclass, field

from soberana.gateway.privacy.config import GuardrailPolicy, PiiPolicy, PrivacyConfig

KINDS = ("soberana", "vllm", "llamacpp", "ollama", "openai")
CAPABILITIES = (
    "chat",
    "completions",
    "embeddings",
    "tool_use",
    "json_mode",
    "speculative-drafter",
)
POOLS = ("primary", "overflow")
PRIVACY_CLASSES = ("onprem", "external")


@dataclass(frozen=True)
class BackendConfig:
    """One upstream serving a public model: where it is, what it can do, how much it takes."""

    name: str
    endpoint: str  # base URL without the /v1 suffix, e.g. http://10.0.0.5:8000
    kind: str
    model: str  # the upstream's own model name, written into the forwarded body
    # Who can read the prompts it receives. Required: a missing class must never mean
    # `onprem`, or an external API would silently receive onprem-only tenants' prompts.
    privacy: str
    api_key_env: str | None = None
    hardware: str = ""
    capabilities: tuple[str, ...] = ("chat", "completions")
    region: str = "default"
    pool: str = "primary"
    max_concurrency: int | None = None  # None: no cap enforced by the gateway
    weight: float = 1.0
    context_window: int | None = None  # tokens; None: unknown, never filtered on


@dataclass(frozen=True)
class ModelRoute:
    """A public model name and the backends that can serve it (a route of the catalog; the
    engine's own `ModelConfig` is a model architecture, soberana/models/config.py)."""

    name: str
    backends: tuple[BackendConfig, ...]
    pii: PiiPolicy | None = None  # privacy hook (issue 22): this route's PII policy


@dataclass(frozen=True)
class TenantConfig:
    """A client organisation: its hashed keys, what it may use and how much."""

    name: str
    key_sha256: tuple[str, ...]  # lower-case hex digests of the accepted API keys
    models: tuple[str, ...] | None = None  # None: every model in the catalog
    privacy: tuple[str, ...] = ("onprem",)
    region: str | None = None
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrency: int | None = None
    weight: float = 1.0  # share of contended slots: a tenant of weight 2 gets twice the slots
    cache_salt: str | None = None  # None: derived from the tenant's name
    # privacy hook (issue 22): None -> redact when leaving the site if `privacy` allows external
    pii: PiiPolicy | None = None
    guardrails: GuardrailPolicy | None = None


@dataclass(frozen=True)
class RoutingConfig:
    """How requests are spread, retried and queued."""

    prefix_affinity: bool = True  # off: conversations are spread by load alone
    max_attempts: int = 3  # upstream attempts per request, across backends
    queue_threshold: int = 8  # a scraped waiting queue longer than this saturates a backend
    queue_timeout_s: float = 10.0  # wait for a free slot this long, then 429
    max_queued: int = 256  # requests waiting for a slot per model; more get 429 at once
    max_queued_per_tenant: int = 64  # ...and per tenant of a model, so no tenant fills the queue
    affinity_load_factor: float = 1.25  # bounded-load consistent hashing: cap = factor * mean
    retry_after_s: int = 1  # Retry-After sent with a 429 from the gateway's own queue


@dataclass(frozen=True)
class TimeoutConfig:
    """Upstream timeouts, in seconds."""

    connect_s: float = 3.0
    first_byte_s: float = 120.0  # until response headers, and again until a stream's first token
    idle_s: float = 120.0  # between two chunks of a stream


@dataclass(frozen=True)
class HealthConfig:
    """Active probing, metric scraping and passive ejection."""

    interval_s: float = 5.0
    timeout_s: float = 2.0
    unhealthy_after: int = 2  # consecutive failed probes that mark a backend down
    eject_after: int = 3  # consecutive failed requests that eject a backend
    cooldown_s: float = 15.0  # an ejected backend gets no traffic for this long
    metrics_interval_s: float = 1.0  # scrape vLLM-style /metrics this often


@dataclass(frozen=True)
class MetricsConfig:
    """Who may read /metrics and what it reveals."""

    api_key_sha256: tuple[str, ...] = ()  # empty: /metrics is open (bind it to a private network)
    tenant_labels: bool = False  # off: tenant names are replaced by "all" in metric labels


@dataclass(frozen=True)
class GatewayConfig:
    """The whole gateway.yaml."""

    models: dict[str, ModelRoute]
    tenants: tuple[TenantConfig, ...]
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    timeouts: TimeoutConfig = field(default_factory=TimeoutConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    host: str = "127.0.0.1"
    port: int = 8080
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)  # privacy hook (issue 22)
