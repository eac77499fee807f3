"""Engine replicas in separate processes see each other's blocks through Redis and through a
shared directory, while writing at the same time."""

from __future__ import annotations

import hashlib
import json

from soberana.kv.redis_tier import RedisTier
from soberana.kv.shared_dir_tier import SharedDirTier
from soberana.kv.warehouse import KVWarehouse
from tests.kv.helpers import block_bytes, make_cache, make_hashes, small_layout, spawn_child

NUM_BLOCKS = 12


def run_replicas(*argvs: list[str]) -> list[dict]:
    """Run replica processes at once; their JSON reports, in order."""
    children = [spawn_child("replica.py", *argv) for argv in argvs]
    reports = []
    try:
        for child in children:
            out, err = child.communicate(timeout=120)
            assert child.returncode == 0, err
            reports.append(json.loads(out))
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.communicate(timeout=10)
    return reports


def expected(seed: int) -> dict:
    cache = make_cache(small_layout(), NUM_BLOCKS, seed=seed)
    digests = [hashlib.sha256(block_bytes(cache, i)).hexdigest() for i in range(NUM_BLOCKS)]
    return {"digests": digests}


def test_replicas_load_what_other_replicas_wrote_through_redis_and_a_shared_dir(
    tmp_path, start_redis
):
    redis_url = start_redis("--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru").url
    stores = ["--redis", redis_url, "--shared-dir", str(tmp_path / "shared")]
    n = str(NUM_BLOCKS)
    # Two replicas write at once: their own conversations (1, 2) and a common one (3).
    written = run_replicas(["write", "1,3", n, *stores], ["write", "2,3", n, *stores])
    assert [w["written"] for w in written] == [2 * NUM_BLOCKS] * 2
    reads = run_replicas(["read", "2,3", n, *stores], ["read", "1,3", n, *stores])
    for report, seeds in zip(reads, ([2, 3], [1, 3]), strict=True):
        for store in ("redis", "shared_dir"):
            for seed in seeds:
                got = report[store][str(seed)]
                assert got["tiers"] == [store] * NUM_BLOCKS, (store, seed)
                assert got["digests"] == expected(seed)["digests"], (store, seed)


def test_a_replica_of_another_model_finds_nothing_for_the_same_tokens(tmp_path, start_redis):
    redis_url = start_redis().url
    writer_layout, other_layout = small_layout(), small_layout(model="another-model")
    shared_dir = tmp_path / "shared"
    writer = KVWarehouse(
        writer_layout,
        shared=[
            RedisTier(redis_url, writer_layout),
            SharedDirTier(shared_dir, 1 << 20, writer_layout),
        ],
    )
    other = KVWarehouse(
        other_layout,
        shared=[
            RedisTier(redis_url, other_layout),
            SharedDirTier(shared_dir, 1 << 20, other_layout),
        ],
    )
    try:
        cache = make_cache(writer_layout, 4)
        for i, h in enumerate(make_hashes(writer_layout, 4, seed=7)):
            writer.put_async(h, cache[:, :, i])
        assert writer.flush(timeout=10)
        same_tokens = make_hashes(other_layout, 4, seed=7)
        assert other.lookup_prefix(same_tokens) == []
        assert [other.get(h) for h in same_tokens] == [None] * 4
        assert writer.lookup_prefix(make_hashes(writer_layout, 4, seed=7)) == ["redis"] * 4
    finally:
        writer.close()
        other.close()
