"""The KV warehouse: tiers below the engine's block pool (host RAM, local disk, Redis, a shared
directory), content-addressed by the engine's block hash. See docs/kv-warehouse.md."""
