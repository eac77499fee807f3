"""Scheduler policy (priority, abort, budgets) and the block pool's cache behaviour."""

from __future__ import annotations

import subprocess
import sys

import pytest

from soberana import LLM, SamplingParams
from soberana.engine.block_hash import chain_hashes
from soberana.engine.block_pool import BlockPool
from soberana.engine.outputs import EngineCoreRequest
from soberana.kv.layout import KVLayout


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM("demo", max_model_len=512, max_num_seqs=1)  # the demo model, one request at a time


def _drain(core) -> list:
    outs = []
    while core.has_unfinished_requests():
        outs += core.step()
    return outs


def test_lower_priority_value_is_served_first(llm):
    core = llm.engine
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    for rid, prio in (("late-low", 5), ("urgent", -1), ("normal", 0)):
        core.add_request(EngineCoreRequest(rid, [10, 11, 12], params, 0.0, priority=prio))
    finished = [o.request_id for o in _drain(core) if o.finish_reason]
    assert finished == ["urgent", "normal", "late-low"]


def test_equal_priority_is_first_come_first_served(llm):
    core = llm.engine
    params = SamplingParams(max_tokens=2, ignore_eos=True)
    for i, rid in enumerate(("a", "b", "c")):
        core.add_request(EngineCoreRequest(rid, [20 + i, 21], params, arrival_time=float(i)))
    assert [o.request_id for o in _drain(core) if o.finish_reason] == ["a", "b", "c"]


def test_abort_frees_blocks_and_other_requests_continue():
    core = LLM("demo", max_model_len=512, max_num_seqs=8).engine
    long = SamplingParams(max_tokens=200, ignore_eos=True)
    core.add_request(EngineCoreRequest("victim", list(range(10, 90)), long, 0.0))
    core.add_request(EngineCoreRequest("bystander", list(range(100, 130)), long.clone(
        max_tokens=20), 0.0))
    for _ in range(3):
        core.step()
    assert core.kv.usage() > 0
    core.abort_requests(["victim", "unknown-id"])
    outs = _drain(core)
    assert {o.request_id for o in outs} == {"bystander"}
    assert outs[-1].finish_reason == "length"
    assert core.kv.usage() == 0.0
    assert not core.has_unfinished_requests()


def test_duplicate_request_id_is_rejected(llm):
    core = llm.engine
    core.add_request(EngineCoreRequest("dup", [1, 2, 3], SamplingParams(max_tokens=1), 0.0))
    with pytest.raises(ValueError, match="already in use"):
        core.add_request(EngineCoreRequest("dup", [1, 2, 3], SamplingParams(), 0.0))
    _drain(core)


def test_freed_cached_blocks_are_reused_least_recently_used_first():
    pool = BlockPool(4, enable_caching=True)
    a, b, c = pool.allocate(3)
    for block, h in ((a, b"A"), (b, b"B"), (c, b"C")):
        pool.register(block, h * 32)
    pool.free([c, b, a])  # freed tail first: c is the oldest free cached block
    assert pool.lookup(b"A" * 32) is a  # freed blocks still serve as cache
    pool.touch([a])  # a hit revives block a
    (d,) = pool.allocate(1)  # the never-cached block goes first
    assert d.block_hash is None and pool.lookup(b"C" * 32) is c
    (e,) = pool.allocate(1)
    assert e is c and pool.lookup(b"C" * 32) is None  # LRU: c evicted before b
    assert pool.lookup(b"B" * 32) is b


def test_block_hashes_are_deterministic_across_processes():
    code = (
        "from soberana.engine.block_hash import chain_hashes;"
        "from soberana.kv.layout import KVLayout;"
        "s = KVLayout('fp', 'float32', 16, 2, 2, 8).fingerprint;"
        "print(b''.join(chain_hashes(s, list(range(50)), 16, 'salt')).hex())"
    )
    outs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={"PYTHONHASHSEED": str(seed), "PATH": "/usr/bin:/bin"}).stdout
        for seed in (1, 2)
    }
    here = b"".join(chain_hashes(_seed("fp", "float32"), list(range(50)), 16, "salt")).hex()
    assert outs == {here + "\n"}


def _seed(model: str, dtype: str, **layout) -> bytes:
    """The engine's hash seed: the KV layout's fingerprint."""
    return KVLayout(model, dtype, **{"block_size": 16, "num_layers": 2, "num_kv_heads": 2,
                                     "head_dim": 8, **layout}).fingerprint


def test_hash_chain_depends_on_parent_salt_and_model():
    seed = _seed("model-a", "float32")
    tokens = list(range(32))
    base = chain_hashes(seed, tokens, 16, None)
    assert len(base) == 2
    other_first_block = chain_hashes(seed, [99] + tokens[1:], 16, None)
    assert other_first_block[1] != base[1]  # same second block, different parent
    assert chain_hashes(seed, tokens, 16, "t1") != base
    assert chain_hashes(_seed("model-b", "float32"), tokens, 16, None) != base
    assert chain_hashes(_seed("model-a", "bfloat16"), tokens, 16, None) != base
    assert chain_hashes(_seed("model-a", "float32", num_kv_heads=4), tokens, 16, None) != base


def test_max_num_batched_tokens_bounds_every_step():
    llm = LLM("demo", max_model_len=512, max_num_batched_tokens=24, max_num_seqs=4)
    core = llm.engine
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    for i in range(4):
        core.add_request(EngineCoreRequest(str(i), list(range(10, 10 + 50 + i)), params, 0.0))
    schedule = core.scheduler.schedule
    steps = []

    def checked_schedule():
        sched = schedule()
        steps.append(sched.num_tokens)
        assert sched.num_tokens <= 24
        assert len(core.scheduler.running) <= 4
        return sched

    core.scheduler.schedule = checked_schedule
    while core.has_unfinished_requests():
        core.step()
    assert steps and all(n > 0 for n in steps)


def test_a_short_prompt_is_not_held_behind_a_long_prefill_past_the_threshold():
    """With long_prefill_token_threshold, the long prompt advances at most that many tokens a
    step and the short prompt behind it is prefilled in the first step; outputs unchanged."""
    prompts = [list(range(10, 10 + 200)), list(range(300, 300 + 12))]
    params = SamplingParams(max_tokens=4, ignore_eos=True, temperature=0.0)
    expected = [o.outputs[0].token_ids for o in
                LLM("demo", max_model_len=512, max_num_batched_tokens=256, dtype="float32").generate(prompts, params)]
    llm = LLM("demo", max_model_len=512, max_num_batched_tokens=256, long_prefill_token_threshold=64,
              dtype="float32")  # chunking changes bf16 rounding, not the computation
    core = llm.engine
    for i, p in enumerate(prompts):
        core.add_request(EngineCoreRequest(str(i), p, params, 0.0))
    first = core.scheduler.schedule
    steps = []

    def recorded():
        sched = first()
        steps.append({s.request.request_id: s.num_new_tokens for s in sched.scheduled})
        return sched

    core.scheduler.schedule = recorded
    outs = {}
    while core.has_unfinished_requests():
        for o in core.step():
            outs.setdefault(o.request_id, []).extend(o.new_token_ids)
    assert steps[0] == {"0": 64, "1": 12}
    assert all(n <= 64 for step in steps for n in step.values())
    assert [outs["0"], outs["1"]] == expected


def test_a_negative_long_prefill_threshold_is_refused():
    with pytest.raises(ValueError, match="long_prefill_token_threshold"):
        LLM("demo", max_model_len=512, long_prefill_token_threshold=-1)
