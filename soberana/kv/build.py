"""The warehouse the `--kv-*` flags describe: its tiers started, or left out when their
storage refuses them."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from soberana.kv.codec import CheckedCodec, SealedCodec
from soberana.kv.config import GB, KVWarehouseConfig
from soberana.kv.disk_tier import DiskTier
from soberana.kv.host_tier import HostTier
from soberana.kv.layout import KVLayout
from soberana.kv.shared_dir_tier import SharedDirTier
from soberana.kv.tier import EntryStore
from soberana.kv.warehouse import KVWarehouse

logger = logging.getLogger("soberana.kv.warehouse")

T = TypeVar("T")


def build_warehouse(config: KVWarehouseConfig, layout: KVLayout) -> KVWarehouse | None:
    """The warehouse `config` describes for `layout`, or None when no tier is configured or
    none could start. A tier that cannot start (a read-only or missing disk, an unusable
    mount) is left out with an error in the log: a cache must never keep the engine from
    serving. Settings that are wrong fail in `config.validate()`, before this."""
    config.validate()
    if not config.enabled():
        return None
    shared_key = config.shared_key() if config.has_shared_tier() else None
    if shared_key:
        stored = SealedCodec(layout, shared_key, config.shared_encrypt).entry_size
    else:
        stored = CheckedCodec(layout).entry_size
    host = HostTier(layout, int(config.offload_gb * GB)) if config.offload_gb else None
    disk = None
    if config.disk_dir:
        disk = _start_tier("disk", DiskTier, config.disk_dir, int(config.disk_gb * GB), layout)
    shared: list[EntryStore] = []
    if config.redis_url:
        from soberana.kv.redis_tier import RedisTier  # the `redis` extra, checked in validate()

        shared.append(RedisTier(config.redis_url, layout, ttl_s=config.redis_ttl_s,
                                stored_entry_size=stored))  # fmt: skip
    if config.shared_dir:
        tier = _start_tier(
            "shared_dir", SharedDirTier, config.shared_dir, int(config.shared_gb * GB), layout,
            stored_entry_size=stored,
        )  # fmt: skip
        shared += [tier] if tier is not None else []
    if host is None and disk is None and not shared:
        logger.error("kv warehouse: no tier could start; serving without one")
        return None
    return KVWarehouse(
        layout,
        host=host,
        disk=disk,
        shared=shared,
        write_buffer_bytes=config.write_buffer_bytes(layout.block_nbytes),
        shared_key=shared_key,
        encrypt=config.shared_encrypt,
    )


def _start_tier(name: str, cls: Callable[..., T], *args, **kwargs) -> T | None:
    """A file tier, or None (logged) when its filesystem refuses it (EROFS, ENOSPC, ...)."""
    try:
        return cls(*args, **kwargs)
    except OSError as e:
        logger.error("kv %s tier cannot start (%s); serving without it", name, e)
        return None
