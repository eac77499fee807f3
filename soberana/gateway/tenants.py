"""Tenants: API-key lookup by hash, per-minute request and token limits, concurrency caps."""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Sequence

from soberana.gateway.config import TenantConfig
from soberana.gateway.errors import GatewayError
from soberana.tenant_salt import derive_salt, load_salt_secret


def hash_key(api_key: str) -> str:
    """The sha256 hex digest under which an API key is stored in gateway.yaml."""
    return hashlib.sha256(api_key.encode()).hexdigest()


def bearer_key_hash(authorization: str | None) -> str | None:
    """The digest of the key in an `Authorization: Bearer <key>` header (None if there is none)."""
    if not authorization or not authorization.startswith("Bearer "):
        return None
    return hash_key(authorization[7:].strip())


def tenant_cache_salt(name: str) -> str:
    """The cache salt of tenant `name`: HMAC-SHA256 under the gateway's salt secret."""
    return derive_salt(_salt_secret(), "soberana-tenant", name)[:32]


@functools.cache
def _salt_secret() -> bytes:
    # $SOBERANA_TENANT_SALT_SECRET_FILE or $SOBERANA_TENANT_SALT_SECRET; random per process
    # otherwise (salts then change on restart: cache misses, never a shared block).
    return load_salt_secret(who="gateway")


class TokenBucket:
    """`per_minute` units refilled continuously; may go into debt when charged after the fact."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self.rate = per_minute / 60.0  # units per second
        self.level = float(per_minute)
        self.updated = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(float(self.per_minute), self.level + (now - self.updated) * self.rate)
        self.updated = now

    def wait_time(self, units: float) -> float:
        """Seconds until `units` are available (0 if they are now)."""
        self._refill()
        return 0.0 if self.level >= units else (units - self.level) / self.rate

    def take(self, units: float) -> None:
        """Spend `units`; negative units give back (never above the bucket's size)."""
        self._refill()
        self.level = min(float(self.per_minute), self.level - units)


class TenantState:
    """A tenant's config plus its live counters (kept across config reloads)."""

    def __init__(self, config: TenantConfig, name_in_metrics: bool = False) -> None:
        self.config = config
        self.in_flight = 0
        self.requests: TokenBucket | None = None
        self.tokens: TokenBucket | None = None
        self.cache_salt = ""
        self.metrics_label = ""  # the tenant label of its metric series
        self.reconfigure(config, name_in_metrics)

    def reconfigure(self, config: TenantConfig, name_in_metrics: bool = False) -> None:
        """Apply new limits; a bucket whose limit is unchanged keeps its level."""
        self.config = config
        # Tenant names can say who the gateway's customers are; /metrics shows them only when
        # the operator opted in (`metrics.tenant_labels`).
        self.metrics_label = config.name if name_in_metrics else "all"
        self.requests = _bucket(self.requests, config.requests_per_minute)
        self.tokens = _bucket(self.tokens, config.tokens_per_minute)
        # A salt derived from the name keeps tenants apart even when none is configured; keyed
        # by the gateway's secret, so whoever reaches a backend directly cannot compute it.
        self.cache_salt = config.cache_salt or tenant_cache_salt(config.name)

    def may_use(self, model: str) -> bool:
        """The tenant's allow-list includes `model` (no list: every model)."""
        return self.config.models is None or model in self.config.models

    def admit(self, tokens: int) -> None:
        """Count a new request against the limits or raise a 429 naming the limit hit.

        `tokens` (prompt estimate plus max_tokens) is reserved from the token bucket up front,
        so concurrent requests cannot together overrun it; `finish` settles the difference.
        """
        cfg = self.config
        if cfg.max_concurrency is not None and self.in_flight >= cfg.max_concurrency:
            raise GatewayError(
                429,
                f"tenant {cfg.name!r} already has {self.in_flight} requests in flight "
                f"(max_concurrency {cfg.max_concurrency})",
                "concurrency_limit_exceeded",
                type_="rate_limit_error",
                retry_after=1,
            )
        if self.tokens is not None:
            if tokens > self.tokens.per_minute:
                raise GatewayError(
                    429,
                    f"this request needs about {tokens} tokens (prompt estimate plus max_tokens), "
                    f"more than tenant {cfg.name!r}'s limit of {cfg.tokens_per_minute} tokens per "
                    "minute; lower max_tokens or shorten the prompt",
                    "rate_limit_exceeded",
                    type_="tokens",
                )
            wait = self.tokens.wait_time(tokens)
            if wait > 0:
                raise GatewayError(
                    429,
                    f"tenant {cfg.name!r} is over its limit of {cfg.tokens_per_minute} tokens per "
                    f"minute (this request needs about {tokens})",
                    "rate_limit_exceeded",
                    type_="tokens",
                    retry_after=wait,
                )
        if self.requests is not None:
            wait = self.requests.wait_time(1)
            if wait > 0:
                raise GatewayError(
                    429,
                    f"tenant {cfg.name!r} is over its limit of {cfg.requests_per_minute} requests per minute",
                    "rate_limit_exceeded",
                    type_="requests",
                    retry_after=wait,
                )
            self.requests.take(1)
        if self.tokens is not None:
            self.tokens.take(tokens)
        self.in_flight += 1

    def finish(self, used: int, reserved: int) -> None:
        """A request admitted with `reserved` tokens ended having used `used` (prompt + completion)."""
        self.in_flight -= 1
        if self.tokens is not None:
            self.tokens.take(used - reserved)


def _bucket(old: TokenBucket | None, per_minute: int | None) -> TokenBucket | None:
    if per_minute is None:
        return None
    if old is not None and old.per_minute == per_minute:
        return old
    return TokenBucket(per_minute)


class TenantRegistry:
    """Finds the tenant of an API key; rebuilt on reload from the previous registry's state."""

    def __init__(
        self,
        configs: Sequence[TenantConfig],
        previous: TenantRegistry | None = None,
        names_in_metrics: bool = False,
    ) -> None:
        old = previous.by_name if previous is not None else {}
        self.by_name: dict[str, TenantState] = {}
        self.by_key_hash: dict[str, TenantState] = {}
        for config in configs:
            state = old.get(config.name)
            if state is None:
                state = TenantState(config, names_in_metrics)
            else:
                state.reconfigure(config, names_in_metrics)
            self.by_name[config.name] = state
            for digest in config.key_sha256:
                self.by_key_hash[digest] = state

    def authenticate(self, authorization: str | None) -> TenantState:
        """The tenant whose key is in an `Authorization: Bearer <key>` header, else a 401."""
        digest = bearer_key_hash(authorization)
        if digest is None:
            raise GatewayError(
                401,
                "missing API key: send it as `Authorization: Bearer <key>`",
                "invalid_api_key",
            )
        tenant = self.by_key_hash.get(digest)
        if tenant is None:
            raise GatewayError(401, "incorrect API key provided", "invalid_api_key")
        return tenant
