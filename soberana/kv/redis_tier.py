"""Redis tier: one store that every engine replica reads and writes."""

from __future__ import annotations

import logging

import redis

from soberana.kv.entry import entry_size
from soberana.kv.layout import KVLayout
from soberana.kv.tier import TierUsage

logger = logging.getLogger(__name__)

# Policies under which Redis itself evicts our keys when `maxmemory` is reached.
EVICTING_POLICIES = ("allkeys-lru", "allkeys-lfu", "allkeys-random")


DEFAULT_KEY_PREFIX = "soberana:kv:"


def tenant_key_pattern(namespace: str, key_prefix: str = DEFAULT_KEY_PREFIX) -> str:
    """A SCAN pattern matching every entry of one tenant namespace, in every layout."""
    return f"{key_prefix}*:t{namespace}:*"


class RedisTier:
    """Entries as Redis strings under `<key_prefix><layout namespace>:[t<tenant namespace>:]
    <block hash hex>` (`namespace.py` says what a tenant namespace is).

    Capacity and eviction belong to the Redis server, so they hold across every replica:
    run it with `maxmemory <bytes>` and `maxmemory-policy allkeys-lru` (Redis's approximate
    LRU). Where that policy cannot be set (a Redis shared with other data), `ttl_s` gives
    every entry an expiry that each read renews (GETEX), so unused blocks age out. SET is
    atomic: readers see a whole entry or none; NX keeps the first of concurrent writers.
    """

    name = "redis"

    def __init__(
        self,
        url: str,
        layout: KVLayout,
        ttl_s: float | None = None,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        timeout_s: float = 1.0,
        stored_entry_size: int | None = None,
    ) -> None:
        self.url = url
        self.ttl_ms = None if ttl_s is None else max(1, int(ttl_s * 1000))
        # Sealed entries (codec.py) are larger than checked ones.
        self.entry_size = stored_entry_size or entry_size(layout)
        self._prefix = f"{key_prefix}{layout.namespace}:".encode()
        self._client = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        self._usage = TierUsage(0, 0, None)
        self.eviction_policy = self._read_eviction_policy()
        if self.eviction_policy is not None:  # else unreachable: the upkeep thread retries
            try:
                self.refresh_usage()
            except redis.RedisError:
                pass

    def _read_eviction_policy(self) -> str | None:
        """Warn at start when nothing will ever evict our keys."""
        try:
            config = self._client.config_get("maxmemory*")
        except redis.RedisError as e:
            logger.warning("kv redis tier %s: cannot read its eviction settings (%s)", self.url, e)
            return None
        policy = config.get("maxmemory-policy")
        maxmemory = int(config.get("maxmemory", 0))
        if self.ttl_ms is None and (maxmemory == 0 or policy not in EVICTING_POLICIES):
            logger.warning(
                "kv redis tier %s has maxmemory=%d, maxmemory-policy=%s: KV blocks will not be "
                "evicted and writes fail once Redis is full; set maxmemory and "
                "maxmemory-policy allkeys-lru, or give --kv-redis-ttl-s",
                self.url,
                maxmemory,
                policy,
            )
        return policy

    def _key(self, key: bytes, namespace: str) -> bytes:
        tenant = f"t{namespace}:".encode() if namespace else b""
        return self._prefix + tenant + key.hex().encode()

    def get(self, key: bytes, namespace: str = "") -> bytes | None:
        if self.ttl_ms is None:
            return self._client.get(self._key(key, namespace))
        return self._client.getex(self._key(key, namespace), px=self.ttl_ms)

    def put(self, key: bytes, entry: bytes, namespace: str = "") -> bool:
        if len(entry) != self.entry_size:
            raise ValueError(f"entry must be {self.entry_size} bytes; got {len(entry)}")
        return bool(self._client.set(self._key(key, namespace), entry, nx=True, px=self.ttl_ms))

    def contains_many(self, keys: list[bytes], namespace: str = "") -> list[bool]:
        pipe = self._client.pipeline(transaction=False)
        for k in keys:
            pipe.exists(self._key(k, namespace))
        return [bool(n) for n in pipe.execute()]

    def discard(self, key: bytes, namespace: str = "") -> None:
        self._client.delete(self._key(key, namespace))

    def usage(self) -> TierUsage:
        """Memory of the whole Redis server (shared with every replica) as of the last
        `refresh_usage`; `entries` is unknown (counting our keys needs a scan). No I/O: the
        engine's thread reads it."""
        return self._usage

    def refresh_usage(self) -> None:
        """Ask the server for its memory use (the warehouse's upkeep thread calls this)."""
        info = self._client.info("memory")
        self._usage = TierUsage(int(info["used_memory"]), int(info["maxmemory"]), None)

    def close(self) -> None:
        self._client.close()
