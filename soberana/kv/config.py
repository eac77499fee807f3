"""The warehouse's settings and their command-line flags (no torch import: the server's
argument parsing uses this)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

GB = 1 << 30
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

    offload_gb: float = 0.0  # host RAM tier; 0 turns it off
    disk_dir: str | None = None
    disk_gb: float = 64.0
    redis_url: str | None = None
    redis_ttl_s: float | None = None  # None: rely on Redis maxmemory + allkeys-lru
    shared_dir: str | None = None
    shared_gb: float = 256.0
    write_buffer_mb: int | None = None  # None: the default, write_buffer_bytes()
    # Hand every block over as soon as it is full, not only when evicted: replicas sharing
    # Redis or a directory can then reuse a conversation this engine still holds.
    write_through: bool = False
    # auto: load from a tier only if it beats recomputing (measured at start); always: load.
    load_policy: str = "auto"
    # The shared tiers' (Redis, shared directory) secret: a file, else $SOBERANA_KV_SHARED_KEY.
    # Without one, shared tiers refuse to start unless marked trusted.
    shared_key_file: str | None = None
    shared_trusted: bool = False
    shared_encrypt: bool = False

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
        for flag, value in (
            ("--kv-offload-gb", self.offload_gb),
            ("--kv-disk-gb", self.disk_gb),
            ("--kv-shared-gb", self.shared_gb),
        ):
            if value < 0:
                raise ValueError(f"{flag} must be >= 0; got {value}")
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
    g = parser.add_argument_group("KV warehouse (tiers below the GPU KV pool)")
    g.add_argument(
        "--kv-offload-gb",
        type=float,
        default=0.0,
        help="host RAM for evicted KV blocks, in GB (pinned on CUDA hosts); 0: off",
    )
    g.add_argument(
        "--kv-disk-dir",
        default=None,
        help="local directory for KV blocks (one engine per directory)",
    )
    g.add_argument("--kv-disk-gb", type=float, default=64.0, help="capacity of --kv-disk-dir in GB")
    g.add_argument(
        "--kv-redis-url",
        default=None,
        help="Redis shared by engine replicas, e.g. redis://host:6379/0; run it "
        "with maxmemory and maxmemory-policy allkeys-lru",
    )
    g.add_argument(
        "--kv-redis-ttl-s",
        type=float,
        default=None,
        help="expire Redis KV entries this long after their last use",
    )
    g.add_argument(
        "--kv-shared-dir",
        default=None,
        help="directory shared by engine replicas (NFS, parallel filesystem)",
    )
    g.add_argument(
        "--kv-shared-gb",
        type=float,
        default=256.0,
        help="capacity of --kv-shared-dir in GB, enforced by every replica",
    )
    g.add_argument(
        "--kv-write-buffer-mb",
        type=int,
        default=None,
        help="staging memory for blocks on their way to the tiers (pinned on CUDA hosts); "
        f"when full, evicted blocks are dropped rather than stalling the engine (default: "
        f"{DEFAULT_WRITE_BUFFER_MB} MB or {DEFAULT_WRITE_BUFFER_BLOCKS} blocks, whichever is "
        "larger)",
    )
    g.add_argument(
        "--kv-write-through",
        action="store_true",
        help="store every full KV block as soon as it is computed (for replicas sharing a "
        "tier), not only blocks evicted from the GPU pool",
    )
    g.add_argument(
        "--kv-load-policy",
        choices=("auto", "always"),
        default="auto",
        help="auto: load a tier's blocks only where that beats recomputing them (measured "
        "at start); always: load whatever is found",
    )
    g.add_argument(
        "--kv-shared-key-file",
        default=None,
        help="file holding the secret (>= 16 bytes) that authenticates the entries of "
        f"--kv-redis-url and --kv-shared-dir; the same on every replica (or ${SHARED_KEY_ENV})",
    )
    g.add_argument(
        "--kv-shared-encrypt",
        action="store_true",
        help="also encrypt shared-tier entries (AES-256-GCM), so the store holds no readable KV",
    )
    g.add_argument(
        "--kv-shared-trusted",
        action="store_true",
        help="run shared tiers without a key: only where no one outside this trust domain "
        "can write the Redis or directory",
    )


def config_from_args(args: argparse.Namespace) -> KVWarehouseConfig:
    """The validated config from parsed `--kv-*` flags."""
    config = KVWarehouseConfig(
        offload_gb=args.kv_offload_gb,
        disk_dir=args.kv_disk_dir,
        disk_gb=args.kv_disk_gb,
        redis_url=args.kv_redis_url,
        redis_ttl_s=args.kv_redis_ttl_s,
        shared_dir=args.kv_shared_dir,
        shared_gb=args.kv_shared_gb,
        write_buffer_mb=args.kv_write_buffer_mb,
        write_through=args.kv_write_through,
        load_policy=args.kv_load_policy,
        shared_key_file=args.kv_shared_key_file,
        shared_trusted=args.kv_shared_trusted,
        shared_encrypt=args.kv_shared_encrypt,
    )
    config.validate()
    return config
