"""The HTTP server's settings of `soberana serve` (the engine's are `EngineConfig`): one
dataclass whose fields are the flags (soberana/config_flags.py)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from soberana.config_flags import flag

API_KEY_ENV = "SOBERANA_API_KEY"


@dataclass
class ServeConfig:
    """Where and how `soberana serve` listens, and who may call it (its logging flags are
    soberana.log's LoggingConfig)."""

    host: str = flag("127.0.0.1", "address to bind")
    port: int = flag(8000, "port to bind; 0 picks a free one")
    api_key: list[str] | None = flag(
        None, "require 'Authorization: Bearer KEY' on the API; repeat for several tenants, each "
        f"key one tenant whose KV cache no other tenant can reuse (default ${API_KEY_ENV})",
        action="append")
    tenant_header: str | None = flag(
        None, "header naming a sub-tenant within the tenant of the request's API key (e.g. "
        "X-Tenant-Id, set by a gateway in front); needs --api-key. Requests of different "
        "tenants never share KV blocks")
    tenant_salt_secret_file: str | None = flag(
        None, "file holding the secret (>= 16 bytes) that keys tenants' KV cache salts "
        "(HMAC-SHA256); default $SOBERANA_TENANT_SALT_SECRET_FILE, $SOBERANA_TENANT_SALT_SECRET, "
        "else random per process (no reuse of tenant-salted blocks across restarts/replicas)")
    allowed_origins: list[str] | None = flag(
        None, "an origin allowed to call the API from a browser (CORS), e.g. "
        "https://app.example.org, or '*'; repeat for several; default: none", action="append")
    max_request_body_mb: float = flag(
        32.0, "answer 413 to a request body larger than this many MiB, before reading it")
    served_model_name: list[str] | None = flag(
        None, "name(s) clients use for the model (default: MODEL as given, or soberana-demo)",
        nargs="+")
    chat_template: str | None = flag(
        None, "Jinja chat template (a file path or the template itself) replacing the model's")
    max_waiting_requests: int = flag(
        1024, "answer 429 with Retry-After when more requests than this wait for the engine")
    shutdown_timeout: float = flag(
        30.0, "on SIGTERM, seconds to let running requests finish; the rest then end with an "
        "OpenAI error (JSON 503, or an SSE error event then [DONE])")
    otlp_traces_endpoint: str | None = flag(
        None, "send OpenTelemetry spans (request, queue, prefill, decode) over OTLP/HTTP to this "
        "collector URL, e.g. http://localhost:4318; default: no tracing")
    stats_log_interval: float = flag(
        10.0, "seconds between engine statistics lines (running, waiting, KV use, tok/s); 0: "
        "none")
    disable_uvicorn_access_log: bool = flag(False, "do not log every request")
    data_parallel_size: int = flag(
        1, "start this many replicas on ports --port, --port+1, ... and print a gateway config "
        "routing over them (docs/distributed.md)")

    def api_keys(self) -> list[str] | None:
        """--api-key, else $SOBERANA_API_KEY, else None (no authentication)."""
        if self.api_key:
            return self.api_key
        return [os.environ[API_KEY_ENV]] if os.environ.get(API_KEY_ENV) else None

    def validate(self) -> None:
        """Raise ValueError naming the first flag outside its allowed range."""
        if self.max_waiting_requests < 1:
            raise ValueError(f"--max-waiting-requests must be >= 1; got {self.max_waiting_requests}")
        if self.shutdown_timeout < 0:
            raise ValueError(f"--shutdown-timeout must be >= 0; got {self.shutdown_timeout}")
        if self.max_request_body_mb <= 0:
            raise ValueError(f"--max-request-body-mb must be > 0; got {self.max_request_body_mb}")
        if self.tenant_header and not self.api_keys():
            raise ValueError("--tenant-header needs --api-key: the header only names sub-tenants "
                             "within the tenant of the key that sent the request")
