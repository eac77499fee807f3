"""The warehouse's settings and their command-line flags (no torch import: the server's
argument parsing uses this)."""

from __future__ import annotations

import argparse
import importlib.util
import os
from dataclasses import dataclass

from soberana.config_flags import add_flags, flag, from_flags

GB = 1 << 30
FLAG_PREFIX = "kv-"  # offload_gb is --kv-offload-gb
# The shared tiers' key, for deployments that pass secrets as environment variables.
SHARED_KEY_ENV = "SOBERANA_KV_SHARED_KEY"
MIN_SHARED_KEY_BYTES = 16
# Default write staging: this much, or room for this many blocks if that is more. One
# admission can evict a whole prompt's blocks at once (a 12k-token prompt of an 8B model is
# 800 blocks of 2 MB; two admissions in a step, 1,600), and blocks that find no slot are
# dropped (1,024 slots dropped 5% of the H200 benchmark's 12k-token histories).
DEFAULT_WRITE_BUFFER_MB = 256
DEFAULT_WRITE_BUFFER_BLOCKS = 2048


@dataclass
class KVWarehouseConfig:
    """Which tiers to run and how big each is; every tier is optional."""

    offload_gb: float = flag(
        0.0, "host RAM for evicted KV blocks, in GB (pinned on CUDA hosts); 0: off")
    disk_dir: str | None = flag(None, "local directory for KV blocks (one engine per directory)")
    disk_gb: float = flag(64.0, "capacity of --kv-disk-dir in GB")
    redis_url: str | None = flag(
        None, "Redis shared by engine replicas, e.g. redis://host:6379/0; run it with maxmemory "
        "and maxmemory-policy allkeys-lru")
    # None: rely on Redis maxmemory + allkeys-lru
    redis_ttl_s: float | None = flag(
        None, "expire Redis KV entries this long after their last use")
    shared_dir: str | None = flag(
        None, "directory shared by engine replicas (NFS, parallel filesystem)")
    shared_gb: float = flag(256.0, "capacity of --kv-shared-dir in GB, enforced by every replica")
    # None: the default, write_buffer_bytes()
    write_buffer_mb: int | None = flag(
        None, "staging memory for blocks on their way to the tiers (pinned on CUDA hosts); when "
        f"full, evicted blocks are dropped rather than stalling the engine (default: "
        f"{DEFAULT_WRITE_BUFFER_MB} MB or {DEFAULT_WRITE_BUFFER_BLOCKS} blocks, whichever is "
        "larger)")
    # Replicas sharing Redis or a directory can then reuse a conversation this engine still holds.
    write_through: bool = flag(
        False, "store every full KV block as soon as it is computed (for replicas sharing a "
        "tier), not only blocks evicted from the GPU pool")
    load_policy: str = flag(
        "auto", "auto: load a tier's blocks only where that beats recomputing them (measured at "
        "start); always: load whatever is found", choices=("auto", "always"))
    # Without a key, shared tiers refuse to start unless marked trusted.
    shared_key_file: str | None = flag(
        None, "file holding the secret (>= 16 bytes) that authenticates the entries of "
        f"--kv-redis-url and --kv-shared-dir; the same on every replica (or ${SHARED_KEY_ENV})")
    shared_trusted: bool = flag(
        False, "run shared tiers without a key: only where no one outside this trust domain can "
        "write the Redis or directory")
    shared_encrypt: bool = flag(
        False, "also encrypt shared-tier entries (AES-256-GCM), so the store holds no readable KV")

    def has_shared_tier(self) -> bool:
        """Whether a tier that other machines can write is configured."""
        return bool(self.redis_url or self.shared_dir)

    def shared_key(self) -> bytes | None:
        """The shared tiers' secret (surrounding whitespace stripped), or None."""
        if self.shared_key_file:
            with open(self.shared_key_file, "rb") as f:
                return f.read().strip()
        value = os.environ.get(SHARED_KEY_ENV)
        return value.strip().encode() if value and value.strip() else None

    def enabled(self) -> bool:
        """Whether any tier is configured."""
        return bool(self.offload_gb or self.disk_dir or self.redis_url or self.shared_dir)

    def write_buffer_bytes(self, block_nbytes: int) -> int:
        """Staging memory of the write path for blocks of `block_nbytes` bytes."""
        if self.write_buffer_mb is not None:
            return self.write_buffer_mb << 20
        return max(DEFAULT_WRITE_BUFFER_MB << 20, DEFAULT_WRITE_BUFFER_BLOCKS * block_nbytes)

    def validate(self) -> None:
        """Raise ValueError naming the first setting outside its allowed range."""
        for option, value in (
            ("--kv-offload-gb", self.offload_gb),
            ("--kv-disk-gb", self.disk_gb),
            ("--kv-shared-gb", self.shared_gb),
        ):
            if value < 0:
                raise ValueError(f"{option} must be >= 0; got {value}")
        if self.disk_dir and self.disk_gb <= 0:
            raise ValueError(f"--kv-disk-gb must be > 0 with --kv-disk-dir; got {self.disk_gb}")
        if self.shared_dir and self.shared_gb <= 0:
            raise ValueError(
                f"--kv-shared-gb must be > 0 with --kv-shared-dir; got {self.shared_gb}"
            )
        if self.redis_ttl_s is not None and self.redis_ttl_s <= 0:
            raise ValueError(f"--kv-redis-ttl-s must be > 0; got {self.redis_ttl_s}")
        if self.redis_url and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(
                f"--kv-redis-url must start with redis://, rediss:// or unix://; "
                f"got {self.redis_url!r}"
            )
        if self.redis_url and importlib.util.find_spec("redis") is None:
            raise ValueError("--kv-redis-url needs the Redis client, which is not installed: "
                             "pip install 'soberana[redis]'")
        if self.load_policy not in ("auto", "always"):
            raise ValueError(f"--kv-load-policy must be auto or always; got {self.load_policy!r}")
        if self.write_buffer_mb is not None and self.write_buffer_mb < 1:
            raise ValueError(f"--kv-write-buffer-mb must be >= 1; got {self.write_buffer_mb}")
        self._validate_shared_key()

    def _validate_shared_key(self) -> None:
        if not self.has_shared_tier():
            return
        try:
            key = self.shared_key()
        except OSError as e:
            raise ValueError(f"--kv-shared-key-file cannot be read: {e}") from None
        if key is None:
            if self.shared_encrypt:
                raise ValueError(
                    "--kv-shared-encrypt needs a key: --kv-shared-key-file or "
                    f"${SHARED_KEY_ENV}"
                )
            if not self.shared_trusted:
                raise ValueError(
                    "--kv-redis-url and --kv-shared-dir need a key shared by the replicas "
                    f"(--kv-shared-key-file or ${SHARED_KEY_ENV}): without one, whoever can "
                    "write the store can change other tenants' outputs. Pass "
                    "--kv-shared-trusted to run without it on a store only this trust "
                    "domain can reach"
                )
        elif len(key) < MIN_SHARED_KEY_BYTES:
            raise ValueError(
                f"the KV shared key must be at least {MIN_SHARED_KEY_BYTES} bytes; got "
                f"{len(key)} (e.g. `head -c 32 /dev/urandom | base64 > kv.key`)"
            )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `--kv-*` flags, for `soberana serve` and the offline tools."""
    group = parser.add_argument_group("KV warehouse (tiers below the GPU KV pool)")
    add_flags(group, KVWarehouseConfig, prefix=FLAG_PREFIX)


def config_from_args(args: argparse.Namespace) -> KVWarehouseConfig:
    """The validated config from parsed `--kv-*` flags."""
    config = from_flags(KVWarehouseConfig, args, prefix=FLAG_PREFIX)
    config.validate()
    return config
