"""The --kv-* flags: each tier is optional, sized in GB, and bad values are refused by name."""

from __future__ import annotations

import argparse

import pytest

from soberana.kv.build import build_warehouse
from soberana.kv.config import add_arguments, config_from_args
from tests.kv.helpers import small_layout


def parse(*argv: str):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_args(parser.parse_args(list(argv)))


def test_without_flags_there_is_no_warehouse():
    config = parse()
    assert not config.enabled()
    assert build_warehouse(config, small_layout()) is None


def test_flags_build_every_tier_in_speed_order(tmp_path, start_redis):
    server = start_redis("--maxmemory", "16mb", "--maxmemory-policy", "allkeys-lru")
    key_file = tmp_path / "kv.key"
    key_file.write_text("a secret of the replicas' trust domain\n")
    config = parse(
        "--kv-shared-key-file", str(key_file),
        "--kv-offload-gb", "0.001",
        "--kv-disk-dir", str(tmp_path / "disk"), "--kv-disk-gb", "0.01",
        "--kv-redis-url", server.url, "--kv-redis-ttl-s", "3600",
        "--kv-shared-dir", str(tmp_path / "shared"), "--kv-shared-gb", "0.01",
        "--kv-write-buffer-mb", "1",
    )  # fmt: skip
    layout = small_layout()
    warehouse = build_warehouse(config, layout)
    try:
        assert warehouse.tier_names == ["host", "disk", "redis", "shared_dir"]
        usage = warehouse.stats().tiers
        assert usage["host"].capacity_bytes == int(0.001 * 2**30) // 1024 * 1024
        assert usage["disk"].capacity_bytes == int(0.01 * 2**30)
        assert usage["redis"].capacity_bytes == 16 << 20
        assert warehouse.shared[0].ttl_ms == 3_600_000
    finally:
        warehouse.close()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--kv-offload-gb", "-1"], "--kv-offload-gb must be >= 0"),
        (["--kv-disk-dir", "/tmp/x", "--kv-disk-gb", "0"], "--kv-disk-gb must be > 0"),
        (["--kv-shared-dir", "/tmp/x", "--kv-shared-gb", "0", "--kv-shared-trusted"],
         "--kv-shared-gb must be > 0"),  # fmt: skip
        (["--kv-redis-url", "localhost:6379", "--kv-shared-trusted"],
         "--kv-redis-url must start with redis://"),  # fmt: skip
        (["--kv-redis-ttl-s", "0"], "--kv-redis-ttl-s must be > 0"),
        (["--kv-write-buffer-mb", "0"], "--kv-write-buffer-mb must be >= 1"),
    ],
)
def test_bad_values_are_refused_naming_the_flag(argv, message):
    with pytest.raises(ValueError, match=message):
        parse(*argv)
