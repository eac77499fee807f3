"""The warehouse wired into the engine: same tokens, hits from the tiers, replicas sharing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from soberana import LLM, SamplingParams
from soberana.kv.config import KVWarehouseConfig
from soberana.kv.layout import KVLayout
from tests.engine.tiny_models import prompts_of_lengths
from tests.kv.helpers import ask_in_rounds, child_env

BLOCK_BYTES = 4 * 2 * 16 * 4 * 32 * 4  # demo model: layers x (k, v) x tokens x heads x dims x 4
POOL_GB = 24 * BLOCK_BYTES / 1e9  # a 24-block GPU pool: two or three conversations
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
USERS = prompts_of_lengths([96 + 7 * i for i in range(6)], seed=21)  # 6 x ~6 blocks


def _rounds(llm: LLM, rounds: int = 4) -> list[list[int]]:
    return ask_in_rounds(llm, USERS, GREEDY, rounds, seed=5)


def test_greedy_tokens_identical_with_the_warehouse_on_and_off_and_hits_come_from_it(tmp_path):
    off = _rounds(LLM("demo", max_model_len=512, kv_cache_gb=POOL_GB))
    warehouse = KVWarehouseConfig(offload_gb=10 * BLOCK_BYTES / 2**30, disk_dir=str(tmp_path),
                                  disk_gb=1.0, load_policy="always")
    llm = LLM("demo", max_model_len=512, kv_cache_gb=POOL_GB, kv_warehouse=warehouse)
    on = _rounds(llm)
    assert on == off
    stats = llm.engine.get_stats().kv_warehouse
    # The working set (~36 blocks) is 1.5x the pool; the host tier holds 10 blocks and
    # spills to disk, which admits blocks seen twice.
    assert stats.tiers["host"].hits > 0
    assert stats.tiers["disk"].hits > 0
    assert stats.prefill_tokens_saved > 0
    assert stats.blocks_loaded * 16 == stats.prefill_tokens_saved
    llm.engine.shutdown()


def test_loaded_blocks_skip_prefill(tmp_path):
    warehouse = KVWarehouseConfig(offload_gb=0.01, load_policy="always")
    llm = LLM("demo", max_model_len=512, kv_cache_gb=POOL_GB, kv_warehouse=warehouse)
    first = llm.generate([USERS[0]], GREEDY)[0]
    computed_before = llm.engine.get_stats().prompt_tokens
    for other in USERS[1:4]:  # push the first user's blocks out of the 24-block pool
        llm.generate([other], GREEDY)
    computed_mid = llm.engine.get_stats().prompt_tokens
    again = llm.generate([USERS[0]], GREEDY)[0]
    computed = llm.engine.get_stats().prompt_tokens - computed_mid
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    full_blocks = (len(USERS[0]) - 1) // 16
    assert again.num_cached_tokens == full_blocks * 16
    assert computed == len(USERS[0]) - full_blocks * 16  # only the partial tail was computed
    assert computed_before == len(USERS[0])
    llm.engine.shutdown()


_REPLICA = """
import json, sys
from soberana import LLM, SamplingParams
from soberana.kv.config import KVWarehouseConfig
cfg = KVWarehouseConfig(**json.loads(sys.argv[1]))
llm = LLM("demo", max_model_len=512, kv_warehouse=cfg)
prompt = json.loads(sys.argv[2])
out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
llm.engine.offload.warehouse.flush(10)
stats = llm.engine.get_stats()
print(json.dumps({"tokens": out.outputs[0].token_ids, "cached": out.num_cached_tokens,
                  "computed": stats.prompt_tokens}))
llm.engine.shutdown()
"""


def _replica(config: dict, prompt: list[int]) -> dict:
    proc = subprocess.run([sys.executable, "-c", _REPLICA, json.dumps(config), json.dumps(prompt)],
                          capture_output=True, text=True, env=child_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("shared", ["redis", "shared_dir"])
def test_second_engine_process_reuses_the_first_ones_kv(shared, tmp_path, start_redis):
    key_file = tmp_path / "kv.key"
    key_file.write_text("the replicas' shared secret")
    if shared == "redis":  # sealed and encrypted
        config = {"redis_url": start_redis().url, "shared_encrypt": True}
    else:  # sealed
        config = {"shared_dir": str(tmp_path / "shared"), "shared_gb": 1.0}
    config |= {"write_through": True, "load_policy": "always", "shared_key_file": str(key_file)}
    prompt = prompts_of_lengths([150], seed=33)[0]
    first = _replica(config, prompt)
    second = _replica(config, prompt)
    assert second["tokens"] == first["tokens"]
    assert first["cached"] == 0 and first["computed"] == 150
    assert second["cached"] == 144  # nine full blocks came from the shared tier
    assert second["computed"] == 150 - 144


def test_corrupt_shared_entries_are_misses_not_wrong_tokens(tmp_path):
    config = {"shared_dir": str(tmp_path / "shared"), "shared_gb": 1.0, "write_through": True,
              "load_policy": "always", "shared_trusted": True}
    prompt = prompts_of_lengths([150], seed=34)[0]
    first = _replica(config, prompt)
    entries = sorted(p for p in (tmp_path / "shared").rglob("*") if p.is_file())
    assert entries
    for i, entry in enumerate(entries):
        data = bytearray(entry.read_bytes())
        if i % 2:
            data[len(data) // 2] ^= 0xFF  # a flipped byte
        else:
            data = data[: len(data) // 3]  # a truncated write
        entry.write_bytes(bytes(data))
    second = _replica(config, prompt)
    assert second["tokens"] == first["tokens"]
    assert second["computed"] > 150 - 144  # the damaged blocks were recomputed


def test_salted_requests_never_load_each_others_blocks(tmp_path):
    from soberana.engine.outputs import EngineCoreRequest

    warehouse = KVWarehouseConfig(offload_gb=0.01, load_policy="always", write_through=True)
    llm = LLM("demo", max_model_len=512, kv_cache_gb=POOL_GB, kv_warehouse=warehouse)
    core = llm.engine
    prompt = USERS[0]

    def run(rid: str, salt: str) -> int:
        core.add_request(EngineCoreRequest(rid, prompt, GREEDY, 0.0, cache_salt=salt))
        outs = []
        while core.has_unfinished_requests():
            outs += core.step()
        for other in USERS[1:4]:  # evict this request's blocks from the pool
            llm.generate([other], GREEDY)
        return outs[0].num_cached_tokens

    assert run("a", "tenant-a") == 0
    assert run("b", "tenant-b") == 0  # same tokens, other tenant: nothing reused
    assert run("c", "tenant-a") == ((len(prompt) - 1) // 16) * 16
    core.shutdown()


def test_evicted_blocks_are_filed_under_their_tenant_and_purged_with_it(tmp_path):
    from soberana.engine.outputs import EngineCoreRequest
    from soberana.kv.purge import purge_tenant

    key_file = tmp_path / "kv.key"
    key_file.write_text("the replicas' shared secret")
    shared = tmp_path / "shared"
    warehouse = KVWarehouseConfig(shared_dir=str(shared), shared_gb=1.0, load_policy="always",
                                  shared_key_file=str(key_file))  # evictions only
    llm = LLM("demo", max_model_len=512, kv_cache_gb=POOL_GB, kv_warehouse=warehouse)
    core = llm.engine
    w = core.offload.warehouse
    # One name for the layout: the pool's hash seed is the warehouse's layout fingerprint,
    # which is the layout of the cache the worker allocated.
    layout = KVLayout.from_kv_cache(core.worker.kv_cache, core.worker.weights_fingerprint)
    assert core.kv.hash_seed == w.layout.fingerprint == layout.fingerprint
    assert core.model_info.fingerprint == layout.fingerprint.hex()
    prompt = USERS[0]
    full = ((len(prompt) - 1) // 16) * 16

    def run(rid: str, salt: str) -> int:
        core.add_request(EngineCoreRequest(rid, prompt, GREEDY, 0.0, cache_salt=salt))
        outs = []
        while core.has_unfinished_requests():
            outs += core.step()
        for other in USERS[1:4]:  # evict this request's blocks from the pool
            llm.generate([other], GREEDY)
        assert w.flush(timeout=30)
        return outs[0].num_cached_tokens

    assert run("a", "acme|chat-1") == 0
    assert run("g", "globex|chat-1") == 0
    assert run("a2", "acme|chat-2") == 0  # another salt of the tenant: other blocks

    def files(salt: str) -> set:
        return set(shared.rglob(f"t{w.namespace_of(salt)}/*/*.kv"))

    acme, globex = files("acme|x"), files("globex|x")
    assert len(acme) >= full // 16 and globex  # both chats of acme's, evicted
    assert purge_tenant(w.namespace_of("acme|x"), shared_dir=shared) == {"shared_dir": len(acme)}
    assert files("acme|x") == set() and files("globex|x") == globex
    assert run("a3", "acme|chat-1") == 0  # purged: recomputed
    assert run("g2", "globex|chat-1") == full  # untouched: from the pool and the tier
    core.shutdown()
