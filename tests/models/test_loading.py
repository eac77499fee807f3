"""Loading models: sharded safetensors, hub ids offline, bad directories, the demo model."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
import torch

from soberana import LLM, SamplingParams
from soberana.models.config import ModelConfig
from soberana.models.loader import resolve_model_path
from tests.engine.tiny_models import build_tiny_model, prompts_of_lengths


def test_sharded_checkpoint_loads_and_generates_like_the_single_file(tmp_path):
    import transformers

    single = tmp_path / "single"
    single.mkdir()
    build_tiny_model(single, "llama")
    sharded = tmp_path / "sharded"
    model = transformers.AutoModelForCausalLM.from_pretrained(single)
    model.save_pretrained(sharded, max_shard_size="100KB")
    for f in single.glob("tokenizer*"):
        (sharded / f.name).write_bytes(f.read_bytes())
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    prompts = prompts_of_lengths([5, 40])
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    a = [o.outputs[0].token_ids for o in LLM(str(single)).generate(prompts, params)]
    b = [o.outputs[0].token_ids for o in LLM(str(sharded)).generate(prompts, params)]
    assert a == b


def test_uncached_hub_id_offline_says_how_to_pass_a_local_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ValueError, match="pass its path"):
        resolve_model_path("someorg/some-model")


def test_missing_directory_and_unsupported_architecture_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        resolve_model_path(str(tmp_path / "nope" / "deeper"))
    with pytest.raises(ValueError, match="unsupported architecture"):
        ModelConfig.from_hf({"architectures": ["GPT2LMHeadModel"]})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="config.json"):
        resolve_model_path(str(tmp_path / "empty"))


def test_llama3_rope_config_reads_both_transformers_layouts():
    base = json.load(open(resolve_model_path("demo") / "config.json"))
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    v4 = ModelConfig.from_hf({**base, "rope_theta": 500000.0, "rope_scaling": scaling})
    v5 = ModelConfig.from_hf({**base, "rope_parameters": {**scaling, "rope_theta": 500000.0}})
    assert v4.rope == v5.rope and v4.rope.rope_type == "llama3" and v4.rope.theta == 500000.0


def test_demo_model_is_deterministic_and_labelled(tmp_path):
    code = "from soberana.models.demo import demo_model_path; print(demo_model_path())"
    dirs = []
    for name in ("a", "b"):
        env = {"SOBERANA_CACHE": str(tmp_path / name), "PATH": "/usr/bin:/bin"}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, check=True)
        dirs.append(out.stdout.strip())
    digest = [
        {f: hashlib.sha256(open(f"{d}/{f}", "rb").read()).hexdigest()
         for f in ("model.safetensors", "tokenizer.json", "config.json")}
        for d in dirs
    ]
    assert digest[0] == digest[1]
    config = json.load(open(f"{dirs[0]}/config.json"))
    assert "random weights" in config["soberana_demo"]


def test_llm_builds_the_demo_on_first_use_beside_its_transformers_import(tmp_path):
    """LLM imports transformers in a thread while the engine starts; on a fresh cache the
    engine builds the demo (its tokenizer from transformers) at the same time. The two
    imports must not race (transformers 5's lazy attribute lookup is not thread-safe)."""
    code = ("from soberana import LLM, SamplingParams\n"
            "out = LLM('demo').generate(['Hello'], SamplingParams(max_tokens=4, temperature=0),"
            " use_tqdm=False)\n"
            "print(len(out[0].outputs[0].token_ids))")
    env = {"SOBERANA_CACHE": str(tmp_path / "fresh"), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "4"


def test_auto_dtype_on_cpu_is_float32_for_a_float32_checkpoint():
    llm = LLM("demo", max_model_len=64)
    assert llm.engine.model_info.dtype == "float32"
    assert llm.engine.worker.kv_cache.dtype == torch.float32


def test_bf16_checkpoint_runs_in_bf16_on_cpu_and_matches_transformers(tmp_path):
    import transformers

    from tests.engine.tiny_models import hf_greedy

    build_tiny_model(tmp_path, "llama")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path)  # a bf16 checkpoint, as real ones are
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    llm = LLM(str(tmp_path), max_model_len=512)
    assert llm.engine.model_info.dtype == "bfloat16"
    prompts = prompts_of_lengths([5, 16, 37, 100, 203])
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    matches = sum(o.outputs[0].token_ids == hf_greedy(hf, p, 8) for p, o in zip(prompts, outs))
    assert matches >= 4  # bf16 rounding may flip a rare near-tie; here all five agreed
