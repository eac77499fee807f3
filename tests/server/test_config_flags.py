"""One source of configuration (issue 18, item 7): the flags of `soberana serve` are the fields
of its configuration dataclasses, `--config FILE.yaml` sets the same flags from a file, and
`LLM(**kw)` passes its keywords straight to EngineConfig."""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from soberana.cli import main
from soberana.config_file import expand_config_file
from soberana.config_flags import from_flags
from soberana.engine.config import KV_CACHE_DTYPE_CHOICES, QUANTIZATION_CHOICES, EngineConfig
from soberana.kv.config import KVWarehouseConfig
from soberana.kv.config import config_from_args as kv_config_from_args
from soberana.server.agent_request import AgentOptions
from soberana.server.cli import add_arguments
from soberana.server.serve_config import ServeConfig

ROOT = Path(__file__).resolve().parents[2]


def _parse(argv: list[str]) -> argparse.Namespace:
    """Parse `soberana serve` arguments as the command does (the config file included)."""
    parser = argparse.ArgumentParser(prog="soberana serve")
    add_arguments(parser)
    return parser.parse_args(expand_config_file(parser, argv))


def _write(tmp_path, text: str) -> str:
    path = tmp_path / "serve.yaml"
    path.write_text(text)
    return str(path)


def test_no_flags_give_the_dataclasses_defaults():
    args = _parse([])
    assert from_flags(EngineConfig, args) == EngineConfig()
    assert from_flags(ServeConfig, args) == ServeConfig()
    assert from_flags(AgentOptions, args) == AgentOptions()
    assert kv_config_from_args(args) == KVWarehouseConfig()


def test_every_engine_field_but_the_nested_ones_is_a_flag():
    flags = {f.name for f in dataclasses.fields(EngineConfig) if "flag" in f.metadata}
    # served_model_name comes from the server's --served-model-name (several names),
    # kv_warehouse from the --kv-* flags.
    assert {f.name for f in dataclasses.fields(EngineConfig)} - flags == {
        "served_model_name", "kv_warehouse"}


def test_flags_reach_the_engine_config_with_their_types():
    args = _parse(["m", "--max-num-seqs", "7", "--no-enable-prefix-caching", "--enforce-eager",
                   "-q", "int8", "--kv-offload-gb", "1.5", "--tool-call-parser", "none"])
    config = from_flags(EngineConfig, args)
    assert (config.model, config.max_num_seqs, config.quantization) == ("m", 7, "int8")
    assert config.enable_prefix_caching is False and config.enforce_eager is True
    assert kv_config_from_args(args).offload_gb == 1.5
    assert from_flags(AgentOptions, args).tool_call_parser is None


def test_flag_choices_match_the_quantization_package():
    from soberana.quantization import KV_CACHE_DTYPES, QUANTIZATION_METHODS

    assert QUANTIZATION_CHOICES == QUANTIZATION_METHODS
    assert KV_CACHE_DTYPE_CHOICES == KV_CACHE_DTYPES


def test_config_file_sets_flags_with_dashes_or_underscores(tmp_path):
    path = _write(tmp_path, "model: demo\nmax-num-seqs: 8\nmax_num_batched_tokens: 512\n"
                            "enable_prefix_caching: false\nkv-write-through: true\n"
                            "served-model-name: [a, b]\napi_key: [k1, k2]\nrevision: null\n"
                            "speculative_config: {method: ngram, num_speculative_tokens: 3}\n")
    args = _parse(["--config", path])
    config = from_flags(EngineConfig, args)
    assert config.model == "demo"
    assert (config.max_num_seqs, config.max_num_batched_tokens) == (8, 512)
    assert config.enable_prefix_caching is False and config.revision is None
    assert json.loads(config.speculative_config) == {"method": "ngram",
                                                     "num_speculative_tokens": 3}
    assert kv_config_from_args(args).write_through is True
    serve = from_flags(ServeConfig, args)
    assert serve.served_model_name == ["a", "b"] and serve.api_key == ["k1", "k2"]


def test_command_line_overrides_the_config_file(tmp_path):
    path = _write(tmp_path, "model: from-file\nmax-num-seqs: 8\napi-key: [file-key]\n"
                            "enable-prefix-caching: true\n")
    args = _parse(["cli-model", "--config", path, "--max-num-seqs=3", "--api-key", "cli-key",
                   "--no-enable-prefix-caching"])
    config = from_flags(EngineConfig, args)
    assert (config.model, config.max_num_seqs, config.enable_prefix_caching) == (
        "cli-model", 3, False)
    assert from_flags(ServeConfig, args).api_key == ["cli-key"]  # not both


def test_config_file_values_are_checked_like_flags(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        _parse(["--config", _write(tmp_path, "dtype: float64\n")])
    assert exc.value.code == 2
    assert "--dtype: invalid choice: 'float64'" in capsys.readouterr().err


def test_unknown_config_key_is_an_error_naming_it(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--config", _write(tmp_path, "max-num-seqs: 4\nmax-num-seq: 4\n")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unknown key 'max-num-seq'" in err and "--max-num-seq" in err


def test_config_file_must_be_a_mapping(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--config", _write(tmp_path, "- max-num-seqs\n")])
    assert "must be a mapping of flag names to values" in capsys.readouterr().err


def test_a_bad_value_from_the_file_stops_serve_before_loading_a_model(tmp_path):
    # The whole path of `soberana serve --config`, in its own process (it configures logging).
    path = _write(tmp_path, "max-num-seqs: 0\nport: 0\n")
    run = subprocess.run([sys.executable, "-m", "soberana.cli", "serve", "--config", path],
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert "max_num_seqs must be >= 1; got 0" in run.stderr


def test_llm_keywords_are_engine_config_fields():
    from soberana.engine.llm import LLM

    with pytest.raises(TypeError, match="max_num_seq"):
        LLM("demo", max_num_seq=4, tune_process_memory=False)


def test_bench_config_file_sets_workload_flags(tmp_path):
    from soberana.bench.cli import add_arguments as add_bench_arguments
    from soberana.bench.config import LengthRange, WorkloadConfig

    parser = argparse.ArgumentParser(prog="soberana bench")
    add_bench_arguments(parser)
    path = _write(tmp_path, "workload: prefix\ninput-len: '8:16'\nnum_prefixes: 2\n")
    args = parser.parse_args(expand_config_file(parser, ["--config", path, "--num-prefixes", "3"]))
    workload = from_flags(WorkloadConfig, args)
    assert (workload.name, workload.input_len, workload.num_prefixes) == (
        "prefix", LengthRange(8, 16), 3)
