"""Deleting one tenant's entries from the shared tiers (`soberana kv purge`)."""

from __future__ import annotations

from pathlib import Path

import redis

from soberana.kv.redis_tier import DEFAULT_KEY_PREFIX, tenant_key_pattern
from soberana.kv.shared_dir_tier import purge_tenant as purge_shared_dir

_SCAN_BATCH = 1000


def purge_redis(url: str, namespace: str, key_prefix: str = DEFAULT_KEY_PREFIX) -> int:
    """Delete every entry of one tenant namespace, in every layout; returns keys removed.

    SCAN walks the keyspace in steps, so Redis keeps serving the replicas meanwhile; UNLINK
    frees the values in the background.
    """
    if not namespace:
        raise ValueError("namespace must not be empty (that is every unsalted block)")
    client = redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=10)
    removed = 0
    try:
        batch: list[bytes] = []
        for key in client.scan_iter(match=tenant_key_pattern(namespace, key_prefix),
                                    count=_SCAN_BATCH):  # fmt: skip
            batch.append(key)
            if len(batch) == _SCAN_BATCH:
                removed += client.unlink(*batch)
                batch.clear()
        if batch:
            removed += client.unlink(*batch)
    finally:
        client.close()
    return removed


def purge_tenant(
    namespace: str, redis_url: str | None = None, shared_dir: str | Path | None = None
) -> dict[str, int]:
    """Entries removed per shared tier, for the tenant namespace `namespace`."""
    removed: dict[str, int] = {}
    if redis_url:
        removed["redis"] = purge_redis(redis_url, namespace)
    if shared_dir:
        removed["shared_dir"] = purge_shared_dir(shared_dir, namespace)
    return removed
