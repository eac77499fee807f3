"""An engine replica's warehouse in its own process, for the sharing tests.

replica.py write SEEDS NUM_BLOCKS [--redis URL] [--shared-dir DIR]
    hand over blocks 0..N-1 of each conversation SEED (comma-separated), wait until stored
replica.py read SEEDS NUM_BLOCKS [--redis URL] [--shared-dir DIR]
    print JSON {store: {seed: {"tiers": lookup result, "digests": sha256 per block}}},
    reading through each store on its own
"""

from __future__ import annotations

import argparse
import hashlib
import json

from soberana.kv.redis_tier import RedisTier
from soberana.kv.shared_dir_tier import SharedDirTier
from soberana.kv.warehouse import KVWarehouse
from tests.kv.helpers import make_cache, make_hashes, small_layout


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("action", choices=["write", "read"])
    parser.add_argument("seeds", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("num_blocks", type=int)
    parser.add_argument("--redis")
    parser.add_argument("--shared-dir")
    args = parser.parse_args()
    layout = small_layout()
    stores = []
    if args.redis:
        stores.append(RedisTier(args.redis, layout))
    if args.shared_dir:
        stores.append(SharedDirTier(args.shared_dir, 1 << 30, layout))
    if args.action == "write":
        warehouse = KVWarehouse(layout, shared=stores)  # writes go through to every store
        for seed in args.seeds:
            cache = make_cache(layout, args.num_blocks, seed=seed)
            for i, h in enumerate(make_hashes(layout, args.num_blocks, seed=seed)):
                assert warehouse.put_async(h, cache[:, :, i])
        assert warehouse.flush(timeout=30)
        print(json.dumps({"written": warehouse.stats().puts}))
        warehouse.close()
        return
    report = {}
    for store in stores:
        warehouse = KVWarehouse(layout, shared=[store])
        report[store.name] = {}
        for seed in args.seeds:
            hashes = make_hashes(layout, args.num_blocks, seed=seed)
            payloads = [warehouse.get(h) for h in hashes]
            report[store.name][str(seed)] = {
                "tiers": warehouse.lookup_prefix(hashes),
                "digests": [p and hashlib.sha256(p).hexdigest() for p in payloads],
            }
        warehouse.close()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
