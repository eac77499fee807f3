"""The KV warehouse under tensor parallelism (CPU, gloo, 2 processes): whole blocks gathered
from the ranks' head shards go to the tiers and come back to every rank's pool."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from soberana import LLM, SamplingParams
from soberana.distributed.kv_blocks import rank_heads, whole_blocks
from soberana.distributed.sharding import plan_shard
from soberana.engine.outputs import EngineCoreRequest
from soberana.kv.codec import EntryRejected, SealedCodec
from soberana.kv.config import KVWarehouseConfig
from soberana.kv.layout import KVLayout
from soberana.models.config import ModelConfig

sys.path.insert(0, str(Path(__file__).parents[1] / "engine"))
from tiny_models import build_tiny_model, prompts_of_lengths  # noqa: E402

from tests.kv.helpers import ask_in_rounds  # noqa: E402

CASES = {
    "llama": ("llama", {}),  # 2 KV heads: one per rank
    "qwen2-kv1": ("qwen2", {"num_key_value_heads": 1}),  # 1 KV head replicated on both ranks
}
# Per rank one KV head: 2 layers x (K, V) x 16 slots x 16 dims x 4 bytes.
_RANK_BLOCK_BYTES = 2 * 2 * 16 * 16 * 4
_BLOCKS = 8  # the pool: the users' ~15 blocks do not fit, so blocks are evicted
GREEDY = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
USERS = prompts_of_lengths([50, 55, 60, 52], seed=7, vocab=935)


def _build(tmp_path: Path, name: str) -> Path:
    arch, fields = CASES[name]
    out = tmp_path / name
    out.mkdir()
    return build_tiny_model(out, arch, vocab_size=935, **fields)


def _llm(path: Path, tp: int, warehouse: KVWarehouseConfig | None = None,
         kv_cache_dtype: str = "auto") -> LLM:
    heads = 2 if tp == 1 and path.name == "llama" else 1  # KV heads in one rank's pool
    itemsize = 1 if kv_cache_dtype == "fp8" else 4
    return LLM(str(path), dtype="float32", max_model_len=128,
               kv_cache_gb=_BLOCKS * _RANK_BLOCK_BYTES // 4 * itemsize * heads / 1e9,
               tensor_parallel_size=tp, kv_warehouse=warehouse, kv_cache_dtype=kv_cache_dtype)


def _rounds(llm: LLM, rounds: int = 3) -> list[list[int]]:
    """Every user asks again each round, one at a time, in a shuffled order."""
    return ask_in_rounds(llm, USERS, GREEDY, rounds, seed=3)


@pytest.mark.parametrize("name", list(CASES))
def test_evicted_prefix_comes_back_from_host_and_disk_with_tokens_of_one_rank(tmp_path, name):
    path = _build(tmp_path, name)
    llm = _llm(path, 1)
    try:
        expected = _rounds(llm)
    finally:
        llm.engine.shutdown()
    # Host RAM holds 3 whole blocks and spills to disk, which admits blocks seen twice.
    whole_block = _RANK_BLOCK_BYTES * (2 if name == "llama" else 1)
    warehouse = KVWarehouseConfig(offload_gb=3 * whole_block / 2**30, disk_dir=str(tmp_path / "d"),
                                  disk_gb=0.01, load_policy="always")
    llm = _llm(path, 2, warehouse)
    try:
        assert llm.engine.offload.warehouse.layout.num_kv_heads == (2 if name == "llama" else 1)
        tokens = _rounds(llm)
        stats = llm.engine.get_stats().kv_warehouse
    finally:
        llm.engine.shutdown()
    assert tokens == expected
    assert stats.tiers["host"].hits > 0
    assert stats.tiers["disk"].hits > 0
    assert stats.prefill_tokens_saved > 0
    assert stats.blocks_loaded * 16 == stats.prefill_tokens_saved


def test_async_scheduling_write_through_and_speculation_together(tmp_path):
    """Gathers and scatters are ordered with the forwards in flight: async scheduling,
    write-through after each step and n-gram verification steps give one rank's tokens."""
    path = _build(tmp_path, "llama")
    llm = _llm(path, 1)
    try:
        expected = _rounds(llm, rounds=2)
    finally:
        llm.engine.shutdown()
    warehouse = KVWarehouseConfig(offload_gb=0.001, load_policy="always", write_through=True)
    llm = LLM(str(path), dtype="float32", max_model_len=128,
              kv_cache_gb=_BLOCKS * _RANK_BLOCK_BYTES / 1e9, tensor_parallel_size=2,
              kv_warehouse=warehouse, async_scheduling=True,
              speculative_config={"method": "ngram", "num_speculative_tokens": 3})
    try:
        tokens = _rounds(llm, rounds=2)
        stats = llm.engine.get_stats()
    finally:
        llm.engine.shutdown()
    assert tokens == expected
    assert stats.kv_warehouse.tiers["host"].hits > 0
    assert stats.spec_decoding.num_draft_tokens > 0


def test_fp8_kv_blocks_cross_ranks_as_bytes(tmp_path):
    """An fp8 pool (gloo has no float8 type): blocks restored from the warehouse give the
    tokens of the same two-rank engine without a warehouse."""
    path = _build(tmp_path, "llama")
    llm = _llm(path, 2, kv_cache_dtype="fp8")
    try:
        expected = _rounds(llm, rounds=2)
    finally:
        llm.engine.shutdown()
    warehouse = KVWarehouseConfig(offload_gb=0.001, load_policy="always")
    llm = _llm(path, 2, warehouse, kv_cache_dtype="fp8")
    try:
        assert llm.engine.offload.warehouse.layout.dtype == "float8_e4m3fn"
        tokens = _rounds(llm, rounds=2)
        stats = llm.engine.get_stats().kv_warehouse
    finally:
        llm.engine.shutdown()
    assert tokens == expected
    assert stats.tiers["host"].hits > 0


def _generate(llm: LLM, rid: str, prompt: list[int], salt: str | None) -> tuple[list[int], int]:
    core = llm.engine
    core.add_request(EngineCoreRequest(rid, prompt, GREEDY, 0.0, cache_salt=salt))
    outs = []
    while core.has_unfinished_requests():
        outs += core.step()
    return [t for o in outs for t in o.new_token_ids], outs[-1].num_cached_tokens


def test_shared_entries_reach_another_tp_engine_but_never_one_rank_or_another_tenant(tmp_path):
    """Write-through into a keyed (HMAC) shared directory: a second TP=2 engine loads the
    prefix; a TP=1 engine of the same model and a TP=2 request of another tenant do not."""
    path = _build(tmp_path, "llama")
    key = tmp_path / "kv.key"
    key.write_text("the replicas' shared secret")
    shared = tmp_path / "shared"
    cfg = KVWarehouseConfig(shared_dir=str(shared), shared_gb=1.0, write_through=True,
                            load_policy="always", shared_key_file=str(key))
    prompt = prompts_of_lengths([70], seed=9, vocab=935)[0]
    full = (len(prompt) - 1) // 16 * 16

    first = _llm(path, 2, cfg)
    try:
        tokens, cached = _generate(first, "a", prompt, "tenant-a")
        assert cached == 0
        first.engine.offload.warehouse.flush(10)
    finally:
        first.engine.shutdown()
    assert len([p for p in shared.rglob("*.kv")]) >= full // 16

    one_rank = _llm(path, 1, cfg)
    try:
        assert one_rank.engine.offload.warehouse.layout.fingerprint != (
            first.engine.offload.warehouse.layout.fingerprint)
        tokens_1, cached_1 = _generate(one_rank, "a", prompt, "tenant-a")
        stats = one_rank.engine.get_stats().kv_warehouse
    finally:
        one_rank.engine.shutdown()
    assert cached_1 == 0 and stats.lookup_hit_blocks == 0
    assert tokens_1 == tokens

    second = _llm(path, 2, cfg)
    try:
        other_tokens, other_cached = _generate(second, "b", prompt, "tenant-b")
        tokens_2, cached_2 = _generate(second, "c", prompt, "tenant-a")
        stats = second.engine.get_stats().kv_warehouse
    finally:
        second.engine.shutdown()
    assert other_cached == 0  # same tokens, another tenant: nothing reused
    assert cached_2 == full  # the whole blocks came back from the shared directory
    assert stats.tiers["shared_dir"].hits >= full // 16
    assert tokens_2 == other_tokens == tokens


def _layout(tp: int, heads: int = 2) -> KVLayout:
    return KVLayout(model_fingerprint="m", dtype="float32", block_size=16, num_layers=2,
                    num_kv_heads=heads, head_dim=16, tensor_parallel_size=tp)


def test_a_tp_entry_is_refused_under_a_one_rank_layout_even_with_the_right_key():
    tp2, tp1 = _layout(2), _layout(1)
    assert tp2.fingerprint != tp1.fingerprint and tp2.namespace != tp1.namespace
    assert tp2.block_nbytes == tp1.block_nbytes  # same bytes: only the fingerprint tells
    key = b"the replicas' shared secret"
    block = b"\x01" * tp2.block_nbytes
    entry = SealedCodec(tp2, key).encode(b"h" * 32, block, "ns")
    assert SealedCodec(tp2, key).decode(b"h" * 32, entry, "ns") == block
    with pytest.raises(EntryRejected):
        SealedCodec(tp1, key).decode(b"h" * 32, entry, "ns")
    with pytest.raises(EntryRejected):
        SealedCodec(_layout(4), key).decode(b"h" * 32, entry, "ns")


def test_one_rank_fingerprint_is_unchanged_by_the_tensor_parallel_field():
    import hashlib

    text = "soberana-kv-layout-v1|m|float32|16|2|2|16|layer,kv,block,slot,kv_head,head_dim"
    assert _layout(1).fingerprint == hashlib.sha256(text.encode()).digest()


@pytest.mark.parametrize("world, kv_heads", [(2, 2), (4, 2), (2, 1), (4, 8)])
def test_whole_blocks_take_each_head_once_and_give_each_rank_its_own(world, kv_heads):
    cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=100, hidden_size=64,
                      intermediate_size=128, num_layers=2, num_heads=8, num_kv_heads=kv_heads,
                      head_dim=8, rms_norm_eps=1e-6, max_position_embeddings=64)
    whole = torch.randn(2, 2, 3, 16, kv_heads, 8)
    shards = [plan_shard(cfg, r, world) for r in range(world)]
    parts = [rank_heads(whole, s).clone() for s in shards]
    assert torch.equal(whole_blocks(parts, kv_heads), whole)
    for s, part in zip(shards, parts):  # what a rank's attention reads: its checkpoint heads
        assert part.shape[4] == s.num_kv_heads
        assert torch.equal(part, whole[:, :, :, :, s.kv_head_start:s.kv_head_start + s.num_kv_heads])
